"""Input pipeline (dgclip.data.loader) and bounded feature caches (dgclip.data.cache).

A run's result must not depend on the number of loader workers: every sample is augmented under
its own seed (run seed, step, index), and `--resume` stays exact while workers prefetch ahead.
"""
import random

import numpy as np
import pytest
import torch

from dgclip.data.cache import CachedFeatures, compute_features, plan_cache
from dgclip.data.catalog import get_spec
from dgclip.data.domainbed import ImageDataset, scan
from dgclip.data.loader import StepSampler, train_loader
from dgclip.engine import TrainConfig, read_records, run_training
from tests.dgclip_fixtures import backbone, cache_dir, data_root  # noqa: F401


def _gopro_dataset(data_root, backbone, n=40, uint8=False):  # noqa: F811
    """GOPro's three views of n images; uint8: the host half of the split transform (the engine's)."""
    from dgclip.data.transfer import split_device_stage
    from dgclip.methods import get_method

    spec = get_spec("rotated-digits")
    records = scan(str(data_root), spec).subset(np.arange(0, 1080, 1080 // n))
    m = get_method("gopro")(backbone, [spec.classname(c) for c in spec.classes], 2, {})
    tf = m.make_train_transform(backbone.preprocess_val)
    return ImageDataset(records, split_device_stage(tf)[0] if uint8 else tf)


def _batches(ds, workers, start=0, steps=3, seed=7, device_stage=None):
    gen = torch.Generator().manual_seed(123)
    for _ in range(start):  # the stream of an uninterrupted run, up to `start`
        torch.randint(len(ds), (6,), generator=gen)
    sampler = StepSampler(lambda g: torch.randint(len(ds), (6,), generator=g), gen, start, steps)
    return list(train_loader(ds, seed, sampler, workers=workers, device_stage=device_stage)), sampler


def test_loader_finishes_uint8_views_exactly_as_the_whole_transform(data_root, backbone):  # noqa: F811
    """A CPU run's loader: uint8 views, then the device stage after collation (in the workers,
    into shared memory): the batches of the whole float transform, bit for bit."""
    from dgclip.data.transfer import split_device_stage

    ref, _ = _batches(_gopro_dataset(data_root, backbone), 0)
    raw = _gopro_dataset(data_root, backbone, uint8=True)
    stage = split_device_stage(_gopro_dataset(data_root, backbone).transform)[1]
    for workers in (0, 2):
        got, _ = _batches(raw, workers, device_stage=stage)
        for (gi, _, _), (ri, _, _) in zip(got, ref):
            assert all(gi[k].dtype == torch.float32 and torch.equal(gi[k], ri[k]) for k in ri)


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_augmented_batches_identical_for_0_1_2_workers(data_root, backbone, uint8):  # noqa: F811
    ds = _gopro_dataset(data_root, backbone, uint8=uint8)
    ref, _ = _batches(ds, 0)
    for workers in (1, 2):
        got, _ = _batches(ds, workers)
        assert len(got) == len(ref) == 3
        for (gi, gl, gd), (ri, rl, rd) in zip(got, ref):
            assert set(gi) == {"original", "moco", "augmix"}
            assert all(v.dtype == (torch.uint8 if uint8 else torch.float32) for v in gi.values())
            assert all(torch.equal(gi[k], ri[k]) for k in ri) and torch.equal(gl, rl) and torch.equal(gd, rd)
    # the views really are random (else the test above proves nothing): another seed differs
    other, _ = _batches(ds, 0, seed=8)
    assert not torch.equal(other[0][0]["moco"], ref[0][0]["moco"])


def test_batches_are_the_per_sample_seeded_items(data_root, backbone):  # noqa: F811
    """Each sample is dataset[index] right after seeding torch, random and numpy with
    sample_seed(seed, step, index) (on one thread), stacked: rebuilt here one sample at a time,
    independently of the loader's batched fetch (generators saved once per batch, images stacked
    into shared memory in the workers), for 0 and 2 workers."""
    from dgclip.data.loader import sample_seed

    ds = _gopro_dataset(data_root, backbone, n=12)
    gen = torch.Generator().manual_seed(123)
    steps = [torch.randint(len(ds), (6,), generator=gen).tolist() for _ in range(2)]
    threads = torch.get_num_threads()
    want = []
    try:
        torch.set_num_threads(1)
        for step, idx in enumerate(steps):
            items = []
            for i in idx:
                s = sample_seed(7, step, i)
                torch.manual_seed(s), random.seed(s), np.random.seed(s % 2 ** 32)
                items.append(ds[i])
            want.append({k: torch.stack([it[0][k] for it in items]) for k in items[0][0]})
    finally:
        torch.set_num_threads(threads)
    for workers in (0, 2):
        got, _ = _batches(ds, workers, steps=2)
        for (images, labels, _), w, idx in zip(got, want, steps):
            assert all(torch.equal(images[k], w[k]) for k in w)
            assert labels.tolist() == [ds[i][1] for i in idx]


def test_main_process_loading_leaves_global_rng_alone(data_root, backbone):  # noqa: F811
    ds = _gopro_dataset(data_root, backbone, n=10)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    _batches(ds, 0, steps=2)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_sampler_state_after_step_while_prefetching(data_root, backbone):  # noqa: F811
    ds = _gopro_dataset(data_root, backbone, n=10)
    _, sampler = _batches(ds, 2, steps=4)  # the workers drew every step before we asked
    gen = torch.Generator().manual_seed(123)
    for _ in range(2):
        torch.randint(len(ds), (6,), generator=gen)
    assert torch.equal(sampler.state_after(1), gen.get_state())
    with pytest.raises(KeyError):
        sampler.state_after(0)  # already dropped: states are kept only from the oldest asked on
    resumed, _ = _batches(ds, 2, start=2, steps=4)
    full, _ = _batches(ds, 0, steps=4)
    assert all(torch.equal(a[0]["augmix"], b[0]["augmix"]) for a, b in zip(resumed, full[2:]))


def _cfg(data_root, cache_dir, out, **kw):  # noqa: F811
    base = dict(method="gopro", dataset="rotated-digits", root=str(data_root), test_domains=["rot75"], seed=0,
                output_dir=str(out), backbone="tiny-digits", pretrained="none", cache_dir=str(cache_dir),
                steps=4, eval_every=2, hparams={"batch_size": 2}, train_domains=["rot0", "rot30"],
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_identical_for_0_and_2_workers_and_resume_exact(data_root, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    """GOPro (three augmented views per image, decoded in the workers): the same training for any
    worker count, and a run cut after step 3 and resumed (2 workers) ends where an uncut one does.
    Also the same when the views cross from the loader as uint8 and are finished by Batch.to (what
    a CUDA run does; on the CPU the loader finishes them: dgclip.data.transfer.stage_in_loader)."""
    from dgclip.methods.base import Batch

    a = run_training(_cfg(data_root, cache_dir, tmp_path / "w0", workers=0))
    b = run_training(_cfg(data_root, cache_dir, tmp_path / "w2", workers=2))
    assert a["feature_cache"]["mode"] == "off" and b["workers"] == 2
    assert a["history"] == b["history"] and a["loss_last"] == b["loss_last"] and a["loss_first"] == b["loss_first"]

    shipped, to = [], Batch.to

    def spy(self, device):
        if self.device_stage is not None:  # straight from a loader (train views or eval images)
            views = self.images.values() if isinstance(self.images, dict) else [self.images]
            shipped.extend((isinstance(self.images, dict), v.dtype) for v in views)
        return to(self, device)

    with monkeypatch.context() as mp:
        mp.setattr(Batch, "to", spy)
        mp.setattr("dgclip.engine.stage_in_loader", lambda device: False)
        u = run_training(_cfg(data_root, cache_dir, tmp_path / "u2", workers=2))
    assert set(shipped) == {(True, torch.uint8), (False, torch.uint8)}
    assert u["history"] == a["history"] and u["loss_last"] == a["loss_last"]
    assert (a["image_normalisation"], u["image_normalisation"]) == ("in the loader, per batch", "on cpu, per batch")

    from dgclip.methods.gopro import GOPro

    calls, orig = {"n": 0}, GOPro.update

    def flaky(self, batch, *rest):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(self, batch, *rest)

    monkeypatch.setattr(GOPro, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(data_root, cache_dir, tmp_path / "cut", workers=2))
    monkeypatch.setattr(GOPro, "update", orig)
    c = run_training(_cfg(data_root, cache_dir, tmp_path / "cut", workers=1, resume=True))
    assert c["history"] == a["history"] and c["loss_last"] == a["loss_last"]
    assert len(read_records(tmp_path / "cut" / "results.jsonl")) == 1


# ---- bounded feature caches ------------------------------------------------------------------

def _plain_dataset(data_root, backbone, n=50):  # noqa: F811
    spec = get_spec("rotated-digits")
    records = scan(str(data_root), spec).subset(np.arange(n))
    return ImageDataset(records, backbone.preprocess_val)


def test_cache_is_float16_memmap_shards_and_resumes(data_root, backbone, tmp_path, monkeypatch):  # noqa: F811
    import dgclip.data.cache as cache

    monkeypatch.setattr(cache, "SHARD_ITEMS", 16)  # 50 items -> 4 shards
    ds = _plain_dataset(data_root, backbone)
    exact = compute_features(backbone, ds, batch_size=8)
    feats = compute_features(backbone, ds, batch_size=8, cache_dir=tmp_path, key="k", workers=2)
    assert isinstance(feats, CachedFeatures) and len(feats) == 50
    shards = sorted((tmp_path / "k").glob("shard*.pooled.npy"))
    assert len(shards) == 4
    assert all(isinstance(s, np.memmap) for s in (feats.shards[0]["pooled"],))
    assert feats.shards[0]["pooled"].dtype == np.float16
    idx = torch.tensor([49, 0, 17, 16, 3, 33])
    got = feats.index(idx).pooled
    assert got.dtype == torch.float32
    assert torch.equal(got, exact.pooled[idx].half().float())  # exactly the float16 rounding
    # an interrupted extraction keeps its finished shards: only the missing one is recomputed
    (tmp_path / "k" / "meta.json").unlink()
    (tmp_path / "k" / "shard00002.done").unlink()
    calls = []
    orig = backbone.image_features
    monkeypatch.setattr(backbone, "image_features", lambda x, **kw: calls.append(len(x)) or orig(x, **kw))
    again = compute_features(backbone, ds, batch_size=8, cache_dir=tmp_path, key="k")
    assert sum(calls) == 16 and torch.equal(again.index(idx).pooled, got)


def test_cache_budget_switches_to_on_the_fly(data_root, cache_dir, tmp_path, backbone):  # noqa: F811
    ds = _plain_dataset(data_root, backbone, n=4)
    small = plan_cache(backbone, ds, 1000, patches=False, layer_stats=False, budget_gb=1e-9)
    assert small.mode == "on-the-fly" and "exceeds the budget" in small.reason and not small.cached
    big = plan_cache(backbone, ds, 1000, patches=False, layer_stats=False, budget_gb=1.0)
    assert big.cached and big.estimated_bytes == 1000 * backbone.image_features(ds[0][0][None]).pooled.numel() * 2
    cfg = dict(method="coop", dataset="rotated-digits", root=str(data_root), test_domains=["rot75"], seed=0,
               backbone="tiny-digits", pretrained="none", cache_dir=str(cache_dir), steps=2, eval_every=2,
               hparams={"batch_size": 2, "n_ctx": 4, "train_augment": "none"},  # frozen features: cacheable
               train_domains=["rot0"], progress=False, workers=0)
    cached = run_training(TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    fly = run_training(TrainConfig(output_dir=str(tmp_path / "b"), feature_cache_budget_gb=1e-9, **cfg))
    assert cached["feature_cache"]["mode"] == "memmap-float16" and cached["feature_cache"]["keys"]["train"]
    assert fly["feature_cache"]["mode"] == "on-the-fly" and not fly["feature_cache"]["keys"]
    # same training either way, up to the float16 storage of the cached features
    assert abs(cached["loss_first"] - fly["loss_first"]) < 1e-2


# ---- recycled shared-memory batches (dgclip.data.shm_pool) -------------------------------------

def _uint8_views(data_root, backbone, n=24):  # noqa: F811
    ds = _gopro_dataset(data_root, backbone, n=n, uint8=True)
    from dgclip.data.transfer import split_device_stage

    return ds, split_device_stage(_gopro_dataset(data_root, backbone, n=2).transform)[1]


@pytest.mark.parametrize("staged", [False, True], ids=["uint8", "finished-in-loader"])
@pytest.mark.parametrize("slots", [2, 18], ids=["few-slots", "default-slots"])
def test_held_batches_are_never_overwritten(data_root, backbone, monkeypatch, staged, slots):  # noqa: F811
    """Every batch kept alive (a list of them, and a view into one) while 2 workers go on: a slot
    is reused only once its batch is gone, so the kept batches equal the 0-worker ones; with
    2 slots per worker the workers also fall back to fresh segments."""
    import dgclip.data.loader as L

    monkeypatch.setattr(L, "SLOTS_PER_WORKER", slots)
    ds, stage = _uint8_views(data_root, backbone)
    stage = stage if staged else None
    ref, _ = _batches(ds, 0, steps=8, device_stage=stage)
    got, _ = _batches(ds, 2, steps=8, device_stage=stage)
    assert len(got) == 8
    for (gi, gl, _), (ri, rl, _) in zip(got, ref):
        assert all(torch.equal(gi[k], ri[k]) for k in ri) and torch.equal(gl, rl)


def test_slots_are_recycled_once_batches_are_dropped(data_root, backbone, monkeypatch):  # noqa: F811
    from dgclip.data.shm_pool import SlotPool

    released, release = [], SlotPool.release
    monkeypatch.setattr(SlotPool, "release", lambda self, token: (released.append(token), release(self, token)))
    ds, _ = _uint8_views(data_root, backbone)
    gen = torch.Generator().manual_seed(0)
    sampler = StepSampler(lambda g: torch.randint(len(ds), (6,), generator=g), gen, 0, 16)
    n = 0
    for images, labels, _ in train_loader(ds, 0, sampler, workers=2):  # each batch dropped at once
        assert images["moco"].dtype == torch.uint8 and len(labels) == 6
        n += 1
    assert len(released) == 15 * 3  # the last batch is still alive (the loop's variables) ...
    del images, labels
    assert n == 16 and len(released) == 16 * 3  # ... and now every view's slot came back
    # 2 workers x 3 views, with the prefetched batches: far fewer slots than the 48 views sent
    assert len(set(released)) < 48 / 2


def test_persistent_eval_loader_repeats_its_batches(data_root, backbone):  # noqa: F811
    """Two passes over a persistent 2-worker evaluation loader (its workers, and so their slots,
    live on): the same batches as the whole transform in the main process."""
    from dgclip.data.loader import eval_loader
    from dgclip.data.transfer import split_device_stage

    records = scan(str(data_root), get_spec("rotated-digits")).subset(np.arange(0, 1080, 54))
    host, stage = split_device_stage(backbone.preprocess_val)
    want = [b[0] for b in eval_loader(ImageDataset(records, backbone.preprocess_val), 4, workers=0)]
    loader = eval_loader(ImageDataset(records, host), 4, workers=2, device_stage=stage)
    for _ in range(2):
        got = [b[0] for b in loader]
        assert len(got) == len(want) == 5 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_unread_releases_do_not_block_exit():
    """Tokens nobody will read (the workers are gone) fill the queue's pipe: the process must
    still exit (a plain multiprocessing queue joins its feeder thread at exit and hangs here)."""
    import subprocess
    import sys

    code = ("from dgclip.data.shm_pool import SlotPool\n"
            "p = SlotPool(1, 4)\n"
            "for i in range(20000):\n"
            "    p.release((0, 1, i))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
