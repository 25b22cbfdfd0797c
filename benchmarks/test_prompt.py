"""Prompt encoding, forward + backward: dgkernels vs the naive CoOp encoder and open_clip encode_text.

ViT-B-16 text tower (random weights, frozen), M = 16 context tokens, class suffixes of 3-8 tokens.
  naive:        CoOp-style: every prompt assembled to 77 tokens, open_clip's own modules
  open_clip:    model.encode_text on 77-token rows (gradient to the positional embedding)
  encode_text:  dgkernels.encode_text on the same rows (truncation only)
  dgkernels:    dgkernels.encode_prompts (truncation + shared prefix + packed suffixes), auto backend
  reference:    dgkernels.encode_prompts(backend="reference"): the plain computation (77 tokens, no sharing)
Default CPU set: (K=65, G=1) with every peer, (K=7, G=32) ours vs naive; DGK_BENCH_LARGE=1 runs
K in {7, 65, 345} x G in {1, 32} with every peer (hours on a CPU: meant for a GPU).
Threads: DGK_BENCH_THREADS (default 1: the CI machine's cores are shared).
"""
import functools
import os

import pytest
import torch

import bench_factories_prompt as bf

cuda = torch.cuda.is_available()
DEVICE = "cuda" if cuda else "cpu"
THREADS = int(os.environ.get("DGK_BENCH_THREADS", "1"))
LARGE = os.environ.get("DGK_BENCH_LARGE", "0") not in ("", "0") or cuda
PRECISION = "bf16" if cuda else "fp32"

ALL = ["naive", "open_clip", "encode_text", "reference", "dgkernels"]
if LARGE:
    CASES = [(k, g, ALL) for g in (1, 32) for k in (7, 65, 345)]
else:
    CASES = [(65, 1, ALL), (7, 32, ["naive", "dgkernels"])]
PARAMS = [(k, g, impl) for k, g, impls in CASES for impl in impls]
SLOW = {"naive", "open_clip", "encode_text", "reference"}  # full 77-token context on a CPU
_MEDIANS: dict = {}


def _wants_memory(k, g, impl):
    return impl in ("naive", "dgkernels") or LARGE or k * g <= 65


@functools.lru_cache(maxsize=None)
def _cpu_peaks() -> dict:
    """Every CPU memory probe, run once before the parent process builds any model (each probe is
    a fresh spawned process; see benchmarks/_memory.py)."""
    from _memory import cpu_peak_mib

    return {(k, g, impl): cpu_peak_mib("bench_factories_prompt:make_run", threads=THREADS, impl=impl, groups=g,
                                       classes=k)
            for k, g, impl in PARAMS if _wants_memory(k, g, impl)}


def _peak_mib(impl, k, g):
    if cuda:
        from _memory import cuda_peak_mib

        return cuda_peak_mib(bf.make_run(impl, g, k, device=DEVICE, precision=PRECISION))
    return _cpu_peaks()[(k, g, impl)]


@pytest.fixture(autouse=True)
def _pinned_threads():
    """THREADS for these benchmarks only: restored after, so files run later in the same pytest
    process (the method steps) keep the machine's default."""
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("k, g, impl", PARAMS, ids=[f"K{k}-G{g}-{i}" for k, g, i in PARAMS])
def test_prompt_encoding_fwd_bwd(benchmark, k, g, impl):
    if not cuda:
        _cpu_peaks()
    run = bf.make_run(impl, g, k, device=DEVICE, precision=PRECISION)
    if impl not in SLOW or cuda:
        run()  # warm-up (lazy init, allocator); the 77-token peers take tens of seconds on a CPU
    if cuda:
        fn = lambda: (run(), torch.cuda.synchronize())  # noqa: E731
    else:
        fn = run
    rounds = 1 if (impl in SLOW and not cuda) else 3
    benchmark.group = f"prompt fwd+bwd K={k} G={g} M=16 ({DEVICE}, {PRECISION})"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    _MEDIANS[(k, g, impl)] = median
    info = dict(K=k, G=g, M=16, sequences=g * k, device=DEVICE, precision=PRECISION, threads=THREADS)
    if _wants_memory(k, g, impl):
        info["peak_mib"] = round(_peak_mib(impl, k, g), 1)
    for peer in ("naive", "open_clip"):
        if (k, g, peer) in _MEDIANS and impl != peer:
            info[f"speedup_vs_{peer}"] = round(_MEDIANS[(k, g, peer)] / median, 2)
    benchmark.extra_info.update(info)
