"""Peak-memory measurement for benchmarks.

CUDA: torch.cuda.max_memory_allocated around the call. CPU: torch has no allocator statistics, so
the call runs in a fresh spawned process and we report its peak resident set size (VmHWM)
above the RSS it had once the inputs were built: memory the op needed beyond its inputs, counting
the gradients it wrote. `factory` is "module:function"; function(**kwargs) builds the inputs and
returns a zero-argument callable that runs the op (forward + backward).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import resource

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    # ru_maxrss survives the exec of a spawned child (it would report the parent's peak); Linux
    # resets the VmHWM high-water mark when "5" is written to clear_refs.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_peak_mib(factory: str, threads: int | None = None, **kwargs) -> float:
    """Peak RSS (MiB) of one call built by `factory(**kwargs)`, above the RSS once inputs exist."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_fresh, args=(factory, kwargs, threads or torch.get_num_threads(), queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {factory} failed: {value}")
    return value / 2**20


def _child_fresh(factory: str, kwargs: dict, threads: int, queue) -> None:
    """Like _child but with no warm-up: baseline = RSS with inputs built, peak = ru_maxrss after one call."""
    try:
        torch.set_num_threads(threads)
        mod, fn = factory.split(":")
        run = getattr(importlib.import_module(mod), fn)(**kwargs)
        base = _rss_bytes()
        _reset_peak_rss()
        run()
        peak = _peak_rss_bytes()
        queue.put(("ok", max(0, peak - base)))
    except BaseException as exc:  # noqa: BLE001
        queue.put(("error", repr(exc)))


def cuda_peak_mib(run, device=None) -> float:
    """Peak CUDA memory (MiB) allocated by run() above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
