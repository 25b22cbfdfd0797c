"""Input pipeline: images/s delivered by the training loader for 0, 1 and 2 workers, against the
images/s a training step consumes, on a generated 224 px DomainBed-layout dataset.

    python -m pytest benchmarks/test_input_pipeline.py --benchmark-only -s

Dataset: PACS layout (4 domains x 7 classes), 227 x 227 JPEGs (quality 90) of smooth random
colour fields plus noise, generated once per session. Pipelines (dgclip.data.loader.train_loader,
per-sample seeded augmentations, collation; pinned memory off on CPU):
  - clip:  open_clip's training transform at 224 px (random resized crop, to tensor, normalise),
  - gopro: GOPro's three views (original, MoCo v3, AugMix) through the 224 px eval transform.
Consumer: one frozen ViT-B/16 image-tower forward of a batch (random weights, fp32; what an
uncached method spends per step on its images) on this machine's CPU threads.
extra_info: images_per_s (and speedup_vs_0 once the 0-worker case of the same pipeline ran).
"""
import os
import time

import numpy as np
import pytest
import torch

BATCH = 32
STEPS = int(os.environ.get("DGCLIP_BENCH_LOADER_STEPS", "8"))
PER_CLASS = 8
_RATES: dict = {}


@pytest.fixture(scope="session")
def pacs_root(tmp_path_factory):
    from PIL import Image

    from dgclip.data.catalog import get_spec

    spec = get_spec("pacs")
    root = tmp_path_factory.mktemp("pacs224")
    rng = np.random.RandomState(0)
    for dom in spec.domains:
        for cls in spec.classes:
            d = root / spec.dirname / dom / cls
            d.mkdir(parents=True)
            for i in range(PER_CLASS):
                base = rng.rand(8, 8, 3)
                img = np.kron(base, np.ones((29, 29, 1)))[:227, :227]
                img = np.clip(img * 255 + rng.randn(227, 227, 3) * 12, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


def _dataset(root, pipeline):
    import open_clip

    from dgclip.data.catalog import get_spec
    from dgclip.data.domainbed import ImageDataset, scan
    from dgclip.methods.views import MultiViewTransform

    records = scan(root, get_spec("pacs"))
    if pipeline == "clip":
        tf = open_clip.image_transform(224, is_train=True)
    else:
        tf = MultiViewTransform(open_clip.image_transform(224, is_train=False))
    return ImageDataset(records, tf)


def _loader(ds, workers):
    from dgclip.data.loader import StepSampler, train_loader

    gen = torch.Generator().manual_seed(0)
    sampler = StepSampler(lambda g: torch.randint(len(ds), (BATCH,), generator=g), gen, 0, STEPS)
    return train_loader(ds, 0, sampler, workers=workers)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("pipeline", ["clip", "gopro"])
def test_loader_images_per_second(benchmark, pacs_root, pipeline, workers):
    ds = _dataset(pacs_root, pipeline)

    def run():
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels, _ in _loader(ds, workers))  # includes worker start-up
        return n / (time.perf_counter() - t0)

    benchmark.group = f"input pipeline {pipeline}"
    rate = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    rate = max(rate, BATCH * STEPS / benchmark.stats.stats.min)
    _RATES[(pipeline, workers)] = rate
    benchmark.extra_info.update({"pipeline": pipeline, "workers": workers, "batch": BATCH, "steps": STEPS,
                                 "images_per_s": rate, "cpus": len(os.sched_getaffinity(0))})
    if (pipeline, 0) in _RATES and workers:
        benchmark.extra_info["speedup_vs_0"] = rate / _RATES[(pipeline, 0)]
    print(f"\n{pipeline} workers={workers}: {rate:.1f} images/s"
          + (f" ({rate / _RATES[(pipeline, 0)]:.2f}x 0 workers)" if workers and (pipeline, 0) in _RATES else ""))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("pipeline", ["clip", "gopro"])
def test_loader_steady_images_per_second(benchmark, pacs_root, pipeline, workers):
    """The rate once the workers run (a training run starts them once): the first WARM batches,
    which hold the start-up and the first prefetches, are not timed."""
    warm = 4
    ds = _dataset(pacs_root, pipeline)

    def run():
        it = iter(_loader(ds, workers))
        for _ in range(warm):
            next(it)
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels, _ in it)
        return n / (time.perf_counter() - t0)

    benchmark.group = f"input pipeline {pipeline}, steady state"
    rate = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    _RATES[(pipeline, workers, "steady")] = rate
    benchmark.extra_info.update({"pipeline": pipeline, "workers": workers, "images_per_s": rate,
                                 "untimed_batches": warm, "timed_batches": STEPS - warm})
    base = _RATES.get((pipeline, 0, "steady"))
    if base and workers:
        benchmark.extra_info["speedup_vs_0"] = rate / base
    print(f"\n{pipeline} workers={workers}, steady: {rate:.1f} images/s" + (f" ({rate / base:.2f}x 0 workers)" if base and workers else ""))


def test_training_step_images_per_second(benchmark):
    """What the loader must keep up with: a frozen ViT-B/16 image forward of one batch here."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
    x = torch.randn(BATCH, 3, 224, 224)

    def step():
        with torch.no_grad():
            model(x)

    benchmark.group = "training step consumer"
    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=1)
    rate = BATCH / benchmark.stats.stats.median
    benchmark.extra_info.update({"model": "ViT-B-16 image tower", "batch": BATCH, "images_per_s": rate,
                                 "steps_per_s": 1 / benchmark.stats.stats.median, "threads": torch.get_num_threads()})
    print(f"\nViT-B/16 frozen image forward: {rate:.1f} images/s ({1 / benchmark.stats.stats.median:.3f} steps/s)")
