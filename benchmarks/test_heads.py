"""Head ops vs the plain PyTorch composition (and Liger-Kernel's fused linear CE on GPU).

Default sizes keep a CPU run to a few minutes: B = 256 over D in {3, 5} x K in {7, 65, 345},
plus the target size B = 4096, D = 5, K = 345 (F = 512), and per-sample class embeddings at
B = 32. DGK_BENCH_FULL=1 runs the whole grid (B in {256, 4096}). Each fused benchmark records the
composition's time in the same process (min of a few runs) and the ratio in extra_info; peak
memory (spawned-process RSS on CPU, allocator peak on CUDA) is recorded at the target sizes.
Run: python -m pytest benchmarks/test_heads.py --benchmark-only
"""
import os
import time

import pytest
import torch

from _memory import cpu_peak_mib, cuda_peak_mib
from bench_factories_heads import make

F = 512
FULL = os.environ.get("DGK_BENCH_FULL", "0") not in ("", "0")
GRID = [(B, D, K) for B in ((256, 4096) if FULL else (256,)) for D in (3, 5) for K in (7, 65, 345)]
if not FULL:
    GRID.append((4096, 5, 345))
TARGET = (4096, 5, 345)
OPS = ["domain_fanout", "domain_cross_entropy", "domain_cross_entropy_all", "head_agreement", "mapper_project",
       "mapper_project_domain", "cosine_cross_entropy"]
PER_SAMPLE = [(32, 1, K) for K in (7, 65, 345)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _min_time(fn, reps=3):
    fn()
    _sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak(op, impl, B, D, K):
    if DEVICE == "cuda":
        return cuda_peak_mib(make(op, impl, B, D, K, F, device="cuda"))
    return cpu_peak_mib("bench_factories_heads:make_cpu", op=op, impl=impl, B=B, D=D, K=K, F=F)


def _bench(benchmark, op, impl, B, D, K):
    fn = make(op, impl, B, D, K, F, device=DEVICE)
    benchmark.group = f"heads {op} B={B} D={D} K={K}"
    benchmark.extra_info.update(op=op, impl=impl, B=B, D=D, K=K, F=F, device=DEVICE)
    if impl != "torch":
        base = make(op, "torch", B, D, K, F, device=DEVICE)
        t_ref = _min_time(base)
        t_own = _min_time(fn)
        benchmark.extra_info.update(torch_s=t_ref, own_s=t_own, speedup_vs_torch=t_ref / t_own)
    if (B, D, K) == TARGET or op.endswith("per_sample") and K == 345:
        benchmark.extra_info["peak_mib"] = _peak(op, impl, B, D, K)
    rounds = 3 if B * D * K >= 4096 * 5 * 65 else 10
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("B,D,K", GRID, ids=[f"B{b}-D{d}-K{k}" for b, d, k in GRID])
@pytest.mark.parametrize("op", OPS)
def test_heads(benchmark, op, B, D, K, impl):
    _bench(benchmark, op, impl, B, D, K)


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("B,D,K", PER_SAMPLE, ids=[f"B{b}-K{k}" for b, _, k in PER_SAMPLE])
def test_cosine_per_sample(benchmark, B, D, K, impl):
    _bench(benchmark, "cosine_cross_entropy_per_sample", impl, B, D, K)


@pytest.mark.gpu
@pytest.mark.parametrize("B,D,K", [(256, 1, 345), (4096, 1, 345)], ids=["B256", "B4096"])
def test_cosine_liger(benchmark, B, D, K):
    pytest.importorskip("liger_kernel")
    _bench(benchmark, "cosine_cross_entropy", "liger", B, D, K)
