"""pytest plugin of scripts/gpu_check.sh: keep only the tests a GPU can show something new with.

Loaded with `-p gpu_test_select` (scripts/ on PYTHONPATH). A test is kept when it
- carries the `gpu` marker (tests that need a CUDA device), or
- uses the `triton_device` fixture (Triton kernels compiled for the GPU, on CUDA tensors; without a
  GPU the same tests run under the interpreter in the CPU suite), or
- is parametrized with the value "cuda" (the compiled CUDA backend or a CUDA device).
Everything else already runs on every CPU machine, and so do the sm_80/sm_90 compile checks
(EXCLUDED_FILES): spending the GPU machine's minutes on them would show nothing new.

`--gpu-select-sample K` keeps only the first K selected tests of each file: the dry run of
gpu_check.sh uses it to run the very command line of the GPU run, end to end, in CPU minutes.
"""
from __future__ import annotations

import os

import pytest

EXCLUDED_FILES = ("test_triton_compile.py", "test_gpu_bench_smoke.py")


def pytest_addoption(parser):
    parser.addoption("--gpu-select-sample", type=int, default=0,
                     help="keep only the first K GPU-selected tests of each file (0: all)")


def _cuda_param(item) -> bool:
    spec = getattr(item, "callspec", None)
    if spec is None:
        return False
    for value in spec.params.values():
        if isinstance(value, str) and value == "cuda":
            return True
        if hasattr(value, "type") and getattr(value, "type", None) == "cuda":  # a torch.device
            return True
    return False


def wanted(item) -> bool:
    if os.path.basename(str(item.fspath)) in EXCLUDED_FILES:
        return False
    return (item.get_closest_marker("gpu") is not None or "triton_device" in getattr(item, "fixturenames", ())
            or _cuda_param(item))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    sample = config.getoption("--gpu-select-sample")
    keep, drop, per_file = [], [], {}
    for item in items:
        ok = wanted(item)
        if ok and sample:
            n = per_file.get(item.fspath, 0)
            ok = n < sample
            per_file[item.fspath] = n + 1
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
