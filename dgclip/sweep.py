"""`dgclip sweep launch | delete_incomplete | list`: DomainBed-style grids of training runs.

One job per (method, dataset, test domain(s), hparam seed, trial seed), each in its own folder
`<sweep dir>/<key>/` named by a stable key (readable fields plus a hash of the job's complete
configuration, so a changed setting is a different job). A job is
  done        its folder holds `done` (written after its results record),
  incomplete  its folder exists without `done` (running, crashed or interrupted),
  not launched otherwise.
`launch` runs every job that is not done; an incomplete job resumes from its checkpoint (the
engine's `--resume`). `delete_incomplete` removes incomplete jobs' folders (they restart from
scratch). `sweep.json` in the sweep folder lists the grid; `dgclip results <sweep dir>` builds the
DomainBed table from the jobs' records (dgclip.results.select_sweep).

With a CoOp-suite `--protocol` the jobs are dgclip.protocols.sweep.SuiteJob (one per method,
dataset and trial seed, run by run_suite_job); they share this module's folders, statuses,
manifest and launchers.

Launchers (dgclip.launchers): local (one job after another in this process), multi_gpu (one
subprocess per visible GPU, each pinned with CUDA_VISIBLE_DEVICES), submitit (SLURM through
submitit, or its local executor; optional dependency `pip install dgclip[slurm]`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["Job", "make_grid", "job_status", "run_job", "launch", "delete_incomplete", "list_jobs"]


@dataclass
class Job:
    """One training run of the grid; `train` holds the remaining TrainConfig fields."""

    method: str
    dataset: str
    test_domains: list
    hparams_seed: int
    trial_seed: int
    sweep_dir: str
    train: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {"method": self.method, "dataset": self.dataset, "test_domains": list(self.test_domains),
                "hparams_seed": self.hparams_seed, "seed": self.trial_seed, **self.train}

    @property
    def key(self) -> str:
        # The complete configuration (defaults filled in, so spelling a default out changes
        # nothing); output_dir / progress / workers / resume do not change results: left out.
        from .engine import TrainConfig

        full = asdict(TrainConfig(**{"root": "", **self.config()}))
        # a preset's record only says where the values come from; the values themselves are fields
        stable = {k: v for k, v in full.items() if k not in ("output_dir", "progress", "workers", "resume", "preset")}
        name = f"{self.method}__{self.dataset}__{'+'.join(self.test_domains)}__h{self.hparams_seed}__t{self.trial_seed}"
        return job_key(name, stable)

    @property
    def folder(self) -> Path:
        return Path(self.sweep_dir) / self.key

    def train_config(self):
        from .engine import TrainConfig

        return TrainConfig(**{**self.config(), "output_dir": str(self.folder), "resume": True, "track_oracle": True})


def make_grid(sweep_dir, methods, datasets, test_domains, n_hparams: int, n_trials: int, *, steps=None,
              hparams: Optional[dict] = None, hparams_seed_start: int = 0, **train) -> list[Job]:
    """The jobs of a grid. test_domains: 'all' (each domain in turn), or names / 'a,b' groups.
    hparams: {method: {name: value}} or {name: value} (every method) overrides of the draws."""
    from .data.catalog import get_spec
    from .data.splits import resolve_test_domains
    from .methods import get_method

    if n_hparams < 1 or n_trials < 1:
        raise ValueError(f"--n-hparams and --n-trials must be >= 1, got {n_hparams} and {n_trials}")
    hparams = hparams or {}
    per_method = all(isinstance(v, dict) for v in hparams.values()) and set(hparams) <= set(methods) and hparams
    jobs = []
    for dataset in datasets:
        spec = get_spec(dataset)
        groups = []
        for td in (test_domains or ["all"]):
            groups += resolve_test_domains(spec, td)
        for method in methods:
            get_method(method)  # unknown methods fail before anything runs
            over = hparams.get(method, {}) if per_method else hparams
            for doms in groups:
                for h in range(hparams_seed_start, hparams_seed_start + n_hparams):
                    for t in range(n_trials):
                        extra = dict(train, hparams=dict(over))
                        if steps is not None:
                            extra["steps"] = steps
                        jobs.append(Job(method, dataset, list(doms), h, t, str(sweep_dir), extra))
    return jobs


def job_key(name: str, settings: dict) -> str:
    """A job folder's name: readable fields, then a digest of every setting that changes results."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{name}__{digest}".replace("/", "_").replace(" ", "_")


def job_status(job: Job) -> str:
    if (job.folder / "done").exists():
        return "done"
    return "incomplete" if job.folder.exists() else "not launched"


def run_in_job_folder(job, work) -> dict:
    """`work()` for `job` in its folder: job.json first, the traceback in error.txt if it fails,
    `done` only after its record is written."""
    job.folder.mkdir(parents=True, exist_ok=True)
    (job.folder / "job.json").write_text(json.dumps(asdict(job), indent=1, default=str))
    try:
        record = work()
    except BaseException:
        (job.folder / "error.txt").write_text(traceback.format_exc())
        raise
    (job.folder / "error.txt").unlink(missing_ok=True)
    (job.folder / "done").write_text(record["run_key"] + "\n")
    return record


def run_job(job: Job) -> dict:
    """Run (or resume) one job in this process; marks it done after its record is written."""
    from .engine import run_training

    return run_in_job_folder(job, lambda: run_training(job.train_config()))


def _write_manifest(sweep_dir: Path, jobs: list[Job]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "sweep.json"
    known = json.loads(path.read_text())["jobs"] if path.exists() else {}
    known.update({j.key: asdict(j) for j in jobs})
    tmp = path.with_name("sweep.json.tmp")
    tmp.write_text(json.dumps({"jobs": known}, indent=1, default=str))
    tmp.replace(path)


def launch(jobs: list[Job], launcher: str = "local", run=None, **launcher_options) -> dict:
    """Run every job that is not done with the named launcher; returns {key: status after}.
    run: the job runner handed to the launcher (default run_job; CoOp-suite jobs pass
    dgclip.protocols.sweep.run_suite_job)."""
    from . import launchers

    if not jobs:
        return {}
    _write_manifest(Path(jobs[0].sweep_dir), jobs)
    todo = [j for j in jobs if job_status(j) != "done"]
    if todo:
        launchers.get(launcher)(todo, run or run_job, **launcher_options)
    return {j.key: job_status(j) for j in jobs}


def delete_incomplete(jobs: list[Job]) -> list[str]:
    removed = []
    for j in jobs:
        if job_status(j) == "incomplete":
            shutil.rmtree(j.folder)
            removed.append(j.key)
    return removed


def list_jobs(jobs: list[Job]) -> list[tuple[str, str]]:
    return [(job_status(j), j.key) for j in jobs]


def _main(argv) -> int:  # a multi_gpu child: run one job described by a job.json
    spec = json.loads(Path(argv[0]).read_text())
    if "protocol" in spec:  # a CoOp-suite job (dgclip.protocols.sweep)
        from .protocols.sweep import SuiteJob, run_suite_job

        run_suite_job(SuiteJob(**spec))
    else:
        run_job(Job(**spec))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
