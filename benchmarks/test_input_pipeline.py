"""Input pipeline: images/s delivered by the training loader for 0, 1 and 2 workers, against the
images/s a training step consumes, on a generated 224 px DomainBed-layout dataset.

    python -m pytest benchmarks/test_input_pipeline.py --benchmark-only -s

The steady-state scaling (test_loader_steady_scaling; target: >= 1.8x images/s at 2
workers vs 0) prints a markdown table at the end; an idle machine is needed for a figure that
means anything (the table states the load average). It also measures this machine's ceiling in
the same rounds: the batches' work with no loader around it (one thread, no transport), one copy
alone and two at once. Two copies at once are what 2 workers could deliver if handing batches
between processes were free, so (2 bare loops / 0 workers) bounds the 2-worker speedup here, and
(2 workers / 2 bare loops) is the loader's own efficiency. Knobs: DGCLIP_BENCH_LOADER_ROUNDS (5),
DGCLIP_BENCH_LOADER_BATCHES (40 timed batches per round), DGCLIP_BENCH_LOADER_STEPS (8, the
start-up-inclusive test). With the defaults the whole file takes about 20 minutes on 2 cores.

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


def _sampler(ds, steps):
    """The batches' keys: the same steps for every loader and bare loop."""
    from dgclip.data.loader import StepSampler

    gen = torch.Generator().manual_seed(0)
    return StepSampler(lambda g: torch.randint(len(ds), (BATCH,), generator=g), gen, 0, steps)


def _loader(ds, workers, steps=STEPS, device_stage=None):
    from dgclip.data.loader import train_loader

    return train_loader(ds, 0, _sampler(ds, steps), workers=workers, device_stage=device_stage)


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


def _bare_loop(ds, stage, go, results):
    """A worker's batches without a DataLoader around them (no transport, no shared memory): the
    seeded samples, collation and the device stage, on one thread, in a fresh forked process.
    Puts None once warmed up, then (after `go`) its images/s."""
    from dgclip.data.loader import Collate, SeededItems

    torch.set_num_threads(1)
    keys = list(_sampler(ds, WARM + TIMED))
    items, collate = SeededItems(ds, 0), Collate(stage)
    for k in keys[:WARM]:
        collate(items.__getitems__(k))
    results.put(None)
    go.wait()
    t0 = time.perf_counter()
    for k in keys[WARM:]:
        collate(items.__getitems__(k))
    results.put(TIMED * BATCH / (time.perf_counter() - t0))


def _bare_round(ds, stage, copies):
    """Images/s of `copies` bare loops run at once (summed): with 2, the most 2 workers could
    deliver on this machine if moving batches between processes cost nothing."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_bare_loop, args=(ds, stage, go, results)) for _ in range(copies)]
    for p in procs:
        p.start()

    def collect():  # one message per copy, without hanging on a copy that died (traceback on stderr)
        out = []
        while len(out) < copies:
            try:
                out.append(results.get(timeout=1))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a bare loop exited with code {dead[0]}")
        return out

    collect()  # every copy warmed up before any is timed
    go.set()
    total = sum(collect())
    for p in procs:
        p.join()
    return total


@pytest.fixture(scope="module")
def steady_table():
    """Rows filled by test_loader_steady_scaling, printed as one markdown table at the end."""
    rows: dict = {}
    yield rows
    if not rows:
        return
    head = ("| pipeline | case | images/s median | min - max | main CPU ms/batch | vs 0 workers "
            "(median of per-round ratios, min - max) | 2 workers vs 2 bare loops |")
    lines = [f"Steady state, {ROUNDS} rounds x {TIMED} timed batches of {BATCH} after {WARM} untimed; "
             f"{len(os.sched_getaffinity(0))} CPUs ({_cpu_model()}); load average {rows.pop('_load')}", "", head,
             "|---|---|---|---|---|---|---|"]
    for (pipeline, case), r in rows.items():
        ratio = "-" if case == 0 else f"{r['speedup']:.2f}x ({r['speedup_min']:.2f} - {r['speedup_max']:.2f})"
        eff = (f"{r['vs_bare']:.2f} ({r['vs_bare_min']:.2f} - {r['vs_bare_max']:.2f})" if "vs_bare" in r else "")
        main_cpu = "" if r["main_cpu_ms"] is None else f"{r['main_cpu_ms']:.1f}"
        lines.append(f"| {pipeline} | {_case_name(case)} | {r['median']:.1f} | {r['min']:.1f} - {r['max']:.1f} | "
                     f"{main_cpu} | {ratio} | {eff} |")
    print("\n\n" + "\n".join(lines))


def _cpu_model() -> str:
    """The CPU's model name (scaling across cores differs between hosts: say which one ran)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def _case_name(case) -> str:
    return {BARE1: "1 bare loop", BARE2: "2 bare loops at once"}.get(case, f"{case} worker" + "s" * (case != 1))


# The machine's own ceiling, measured in the same rounds: the batches' work without a loader (see
# _bare_loop), once alone and twice at once. Two copies at once is what 2 workers would deliver if
# moving the batches cost nothing; (2 bare loops / 0 workers) bounds the 2-worker speedup here.
BARE1, BARE2 = "bare1", "bare2"
CASES = WORKERS + (BARE1, BARE2)


def _ratios(num, den):
    r = [a / b for a, b in zip(num, den)]
    return float(np.median(r)), min(r), max(r)


@pytest.mark.parametrize("pipeline", ["clip", "clip-uint8", "clip-float", "gopro"])
def test_loader_steady_scaling(benchmark, pacs_root, pipeline, steady_table):
    """Images/s with the workers already running, as in a training run (one loader for all steps),
    for 0, 1 and 2 workers and the bare loops, measured in the same rounds; each scaling is the
    median over rounds of the same-round ratio."""
    ds, stage = _dataset(pacs_root, pipeline)
    rates = {c: [] for c in CASES}
    cpu = {c: [] for c in CASES}
    load0 = os.getloadavg()[0]

    def run():
        for r in range(ROUNDS):
            for c in CASES[r % len(CASES):] + CASES[:r % len(CASES)]:
                if c in (BARE1, BARE2):
                    rates[c].append(_bare_round(ds, stage, 1 if c == BARE1 else 2))
                else:
                    rate, ms = _steady_round(ds, c, stage)
                    rates[c].append(rate)
                    cpu[c].append(ms)

    benchmark.group = f"input pipeline {pipeline}, steady state"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    load = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    steady_table["_load"] = load
    for c in CASES:
        row = {"median": float(np.median(rates[c])), "min": min(rates[c]), "max": max(rates[c]),
               "main_cpu_ms": float(np.median(cpu[c])) if cpu[c] else None, "rates": rates[c]}
        if c != 0:
            row["speedup"], row["speedup_min"], row["speedup_max"] = _ratios(rates[c], rates[0])
        if c == 2:
            row["vs_bare"], row["vs_bare_min"], row["vs_bare_max"] = _ratios(rates[2], rates[BARE2])
        steady_table[(pipeline, c)] = row
        benchmark.extra_info[_case_name(c).replace(" ", "_")] = row
    benchmark.extra_info.update({"pipeline": pipeline, "batch": BATCH, "rounds": ROUNDS, "timed_batches": TIMED,
                                 "untimed_batches": WARM, "load_average": load})
    row2 = steady_table[(pipeline, 2)]
    print(f"\n{pipeline}: " + ", ".join(f"{_case_name(c)} {steady_table[(pipeline, c)]['median']:.1f} img/s"
                                        for c in CASES)
          + f"; 2 workers vs 0: {row2['speedup']:.2f}x; 2 bare loops vs 0 workers: "
          f"{steady_table[(pipeline, BARE2)]['speedup']:.2f}x; 2 workers vs 2 bare loops: {row2['vs_bare']:.2f}")


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
