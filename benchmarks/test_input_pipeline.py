"""Input pipeline: images/s delivered by the training loader for 0, 1 and 2 workers, against the
images/s a training step consumes, on a generated 224 px DomainBed-layout dataset.

    python -m pytest benchmarks/test_input_pipeline.py --benchmark-only -s

The steady-state scaling (test_loader_steady_scaling; issue 13's target: >= 1.8x images/s at 2
workers vs 0) prints a markdown table at the end; an idle machine is needed for a figure that
means anything (the table states the load average). Knobs: DGCLIP_BENCH_LOADER_ROUNDS (5),
DGCLIP_BENCH_LOADER_BATCHES (40 timed batches per round), DGCLIP_BENCH_LOADER_STEPS (8, the
start-up-inclusive test). With the defaults the whole file takes about 10 minutes on 2 cores.

Dataset: PACS layout (4 domains x 7 classes), 227 x 227 JPEGs (quality 90) of smooth random
colour fields plus noise, generated once per session. Pipelines (dgclip.data.loader.train_loader,
per-sample seeded augmentations, collation; pinned memory off on CPU), each as the engine runs it
on this CPU: the host half of the split transform per image, then the device stage (float
conversion, normalisation) once per batch after collation, in the workers (dgclip.data.transfer):
  - clip:  open_clip's training transform at 224 px (random resized crop, to tensor, normalise),
  - clip-uint8: the same loader as a CUDA run has it: uint8 images out, the device stage left to
           the device (not run here),
  - clip-float: the whole transform per image in the loader (the pipeline before
           dgclip.data.transfer), for comparison,
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
    """(dataset, device stage for the loader to apply, or None)."""
    import open_clip

    from dgclip.data.catalog import get_spec
    from dgclip.data.domainbed import ImageDataset, scan
    from dgclip.data.transfer import split_device_stage
    from dgclip.methods.views import MultiViewTransform

    records = scan(root, get_spec("pacs"))
    if pipeline.startswith("clip"):
        tf = open_clip.image_transform(224, is_train=True)
    else:
        tf = MultiViewTransform(open_clip.image_transform(224, is_train=False))
    if pipeline == "clip-float":
        return ImageDataset(records, tf), None
    host, stage = split_device_stage(tf)
    return ImageDataset(records, host), None if pipeline == "clip-uint8" else stage


def _loader(ds, workers, steps=STEPS, device_stage=None):
    from dgclip.data.loader import StepSampler, train_loader

    gen = torch.Generator().manual_seed(0)
    sampler = StepSampler(lambda g: torch.randint(len(ds), (BATCH,), generator=g), gen, 0, steps)
    return train_loader(ds, 0, sampler, workers=workers, device_stage=device_stage)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("pipeline", ["clip", "gopro"])
def test_loader_images_per_second(benchmark, pacs_root, pipeline, workers):
    ds, stage = _dataset(pacs_root, pipeline)

    def run():
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels, _ in _loader(ds, workers, device_stage=stage))  # includes start-up
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


# Steady state: ROUNDS rounds; in each, one loader per worker count (interleaved, the order rotated
# every round, so a change of machine load hits every count alike), WARM untimed batches (worker
# start-up, first prefetches), then TIMED timed batches.
ROUNDS = int(os.environ.get("DGCLIP_BENCH_LOADER_ROUNDS", "5"))
TIMED = int(os.environ.get("DGCLIP_BENCH_LOADER_BATCHES", "40"))
WARM = 4
WORKERS = (0, 1, 2)


def _steady_round(ds, workers, stage=None):
    """(images/s, main-process CPU ms per batch) over TIMED batches once WARM batches are out."""
    it = iter(_loader(ds, workers, steps=WARM + TIMED, device_stage=stage))
    for _ in range(WARM):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(labels) for _, labels, _ in it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert n == TIMED * BATCH
    return n / wall, 1e3 * cpu / TIMED


@pytest.fixture(scope="module")
def steady_table():
    """Rows filled by test_loader_steady_scaling, printed as one markdown table at the end."""
    rows: dict = {}
    yield rows
    if not rows:
        return
    head = ("| pipeline | workers | images/s median | min - max | main CPU ms/batch | vs 0 workers "
            "(median of per-round ratios, min - max) |")
    lines = [f"Steady state, {ROUNDS} rounds x {TIMED} timed batches of {BATCH} after {WARM} untimed; "
             f"{len(os.sched_getaffinity(0))} CPUs; load average {rows.pop('_load')}", "", head,
             "|---|---|---|---|---|---|"]
    for (pipeline, workers), r in rows.items():
        ratio = "-" if workers == 0 else f"{r['speedup']:.2f}x ({r['speedup_min']:.2f} - {r['speedup_max']:.2f})"
        lines.append(f"| {pipeline} | {workers} | {r['median']:.1f} | {r['min']:.1f} - {r['max']:.1f} | "
                     f"{r['main_cpu_ms']:.1f} | {ratio} |")
    print("\n\n" + "\n".join(lines))


@pytest.mark.parametrize("pipeline", ["clip", "clip-uint8", "clip-float", "gopro"])
def test_loader_steady_scaling(benchmark, pacs_root, pipeline, steady_table):
    """Images/s with the workers already running, as in a training run (one loader for all steps),
    for 0, 1 and 2 workers measured in the same rounds; the scaling is the median over rounds of
    (rate at w workers / rate at 0 workers in the same round)."""
    ds, stage = _dataset(pacs_root, pipeline)
    rates = {w: [] for w in WORKERS}
    cpu = {w: [] for w in WORKERS}
    load0 = os.getloadavg()[0]

    def run():
        for r in range(ROUNDS):
            for w in WORKERS[r % len(WORKERS):] + WORKERS[:r % len(WORKERS)]:
                rate, ms = _steady_round(ds, w, stage)
                rates[w].append(rate)
                cpu[w].append(ms)

    benchmark.group = f"input pipeline {pipeline}, steady state"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    load = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    steady_table["_load"] = load
    for w in WORKERS:
        row = {"median": float(np.median(rates[w])), "min": min(rates[w]), "max": max(rates[w]),
               "main_cpu_ms": float(np.median(cpu[w])), "rates": rates[w]}
        if w:
            ratios = [a / b for a, b in zip(rates[w], rates[0])]
            row.update(speedup=float(np.median(ratios)), speedup_min=min(ratios), speedup_max=max(ratios))
        steady_table[(pipeline, w)] = row
        benchmark.extra_info[f"workers_{w}"] = row
    benchmark.extra_info.update({"pipeline": pipeline, "batch": BATCH, "rounds": ROUNDS, "timed_batches": TIMED,
                                 "untimed_batches": WARM, "load_average": load})
    print(f"\n{pipeline}: " + ", ".join(f"{w} workers {steady_table[(pipeline, w)]['median']:.1f} img/s"
                                        for w in WORKERS)
          + f"; 2 vs 0: {steady_table[(pipeline, 2)]['speedup']:.2f}x")


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
