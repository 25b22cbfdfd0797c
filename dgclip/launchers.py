"""Sweep launchers: how the jobs of `dgclip sweep launch` run.

local      one job after another in this process (a failing job is reported, the rest still run).
multi_gpu  one `python -m dgclip.launchers JOB.json` subprocess per visible GPU at a time, each
           pinned with CUDA_VISIBLE_DEVICES (so any job may still use torchrun-style data
           parallelism within itself when launched that way by hand).
submitit   submitit's AutoExecutor: SLURM on a cluster (`cluster=None` lets submitit detect it,
           `slurm_*` options pass through), or `cluster="local"` / "debug" for its local executors.
A launcher is `launcher(jobs, run_job, **options)`: it calls `run_job(job)` for each job (the
sweep passes dgclip.sweep.run_job, which resumes an interrupted job and marks it done), so this
module never imports the sweep. The multi_gpu children run `python -m <child_module> JOB.json`
(default dgclip.sweep, whose __main__ runs one job).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["get", "LAUNCHERS"]


def _local(jobs, run_job, **_options) -> None:
    failed = []
    for i, job in enumerate(jobs):
        print(f"[sweep] {i + 1}/{len(jobs)} {job.key}", flush=True)
        try:
            run_job(job)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed job must not stop the sweep
            failed.append(job.key)
            print(f"[sweep] {job.key} failed: {exc} (traceback in {job.folder / 'error.txt'})", file=sys.stderr)
    if failed:
        print(f"[sweep] {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() != ""]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _multi_gpu(jobs, run_job=None, gpus=None, poll_s: float = 1.0, child_module: str = "dgclip.sweep",
               **_options) -> None:
    # run_job is unused here: each job runs in a child process (`python -m child_module JOB.json`)
    gpus = list(gpus) if gpus is not None else _visible_gpus()
    if not gpus:
        raise RuntimeError("multi_gpu launcher: no visible GPU (use --launcher local)")
    pending, running = list(jobs), {}
    while pending or running:
        for gpu in gpus:
            if gpu not in running and pending:
                job = pending.pop(0)
                job.folder.mkdir(parents=True, exist_ok=True)
                spec = job.folder / "job.json"
                spec.write_text(json.dumps(asdict(job), default=str))
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
                log = open(job.folder / "stdout.txt", "ab")
                running[gpu] = (job, subprocess.Popen([sys.executable, "-m", child_module, str(spec)], env=env,
                                                      stdout=log, stderr=subprocess.STDOUT), log)
                print(f"[sweep] gpu {gpu}: {job.key}", flush=True)
        for gpu, (job, proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[gpu]
                if proc.returncode:
                    print(f"[sweep] {job.key} failed (exit {proc.returncode}; see {job.folder})", file=sys.stderr)
        time.sleep(poll_s)


def _submitit(jobs, run_job, folder=None, cluster=None, wait: bool = True, **options) -> list:
    try:
        import submitit
    except ImportError as exc:
        raise RuntimeError("the submitit launcher needs submitit: pip install 'dgclip[slurm]' (or pip install submitit)") from exc

    folder = Path(folder) if folder else Path(jobs[0].sweep_dir) / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if options:
        executor.update_parameters(**options)
    with executor.batch():
        handles = [executor.submit(run_job, job) for job in jobs]
    for job, h in zip(jobs, handles):
        print(f"[sweep] submitted {job.key} as {h.job_id}", flush=True)
    if wait:
        for job, h in zip(jobs, handles):
            try:
                h.result()
            except Exception as exc:  # noqa: BLE001 - report every failure, keep waiting for the rest
                print(f"[sweep] {job.key} failed: {exc}", file=sys.stderr)
    return handles


LAUNCHERS = {"local": _local, "multi_gpu": _multi_gpu, "submitit": _submitit}


def get(name: str):
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r}; expected one of {sorted(LAUNCHERS)}")
    return LAUNCHERS[name]
