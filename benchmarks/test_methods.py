"""One training step (forward + backward + optimiser step) of GOPro, SeeCLIP and DALSCLIP.

    python -m pytest benchmarks/test_methods.py --benchmark-only
    DGCLIP_BENCH_MEMORY=1 ...            also the peak RSS of one step (spawned process per case)
    DGCLIP_BENCH_MODEL=ViT-B-16 ...      the full ViT-B/16 text tower (big machines)

Variants (see bench_factories_methods): dgkernels (automatic backends), reference (every dgkernels op
on its plain PyTorch reference, DGKERNELS_BACKEND=reference: prompts at the full 77-token context,
no prefix sharing) and naive (the released code's way: the same prompts through open_clip's own
modules, the public peer). K = 7 (PACS-like) and 65 (OfficeHome-like).
extra_info carries the sizes, the median time of the reference and naive runs of the same case
(when they ran first in this session) and the speed-up of this variant over them.
"""
import os

import pytest
import torch

import bench_factories_methods as factories

VARIANTS = ("reference", "naive", "dgkernels")  # the baselines first, so the last run can report ratios
_MEDIANS: dict[tuple, float] = {}


@pytest.fixture(scope="module")
def backbone():
    return factories.build_backbone()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [7, 65])
@pytest.mark.parametrize("method", ["gopro", "seeclip", "dalsclip"])
def test_method_step(benchmark, backbone, method, k, variant):
    step = factories.make_step(method, k, variant, backbone)
    benchmark.group = f"{method} step K={k}"
    b = factories.BATCH[method]
    sequences = {"gopro": 3 * b * k, "seeclip": (b + max(1, round(0.1 * b))) * (k + 1), "dalsclip": 3 * k}[method]
    benchmark.extra_info.update({"method": method, "classes": k, "batch": b, "variant": variant, "model": factories.MODEL,
                                 "prompt_sequences": sequences, "threads": torch.get_num_threads()})
    slow = variant != "dgkernels"  # the full-context baselines take tens of seconds a step on a CPU
    benchmark.pedantic(step, rounds=1 if slow else 3, warmup_rounds=0 if slow else 1, iterations=1)
    median = benchmark.stats.stats.median
    _MEDIANS[(method, k, variant)] = median
    for base in ("reference", "naive"):
        if base != variant and (method, k, base) in _MEDIANS:
            benchmark.extra_info[f"{base}_s"] = _MEDIANS[(method, k, base)]
            benchmark.extra_info[f"speedup_vs_{base}"] = _MEDIANS[(method, k, base)] / median
    if os.environ.get("DGCLIP_BENCH_MEMORY") == "1":
        from _memory import cpu_peak_mib

        benchmark.extra_info["peak_mib"] = cpu_peak_mib("bench_factories_methods:make_step", method=method, k=k, variant=variant)
