"""The input pipeline: DataLoaders for training, evaluation and feature extraction.

Images are decoded and augmented in worker processes (`workers`), pinned when the run is on CUDA,
prefetched, with persistent workers for loaders iterated more than once (evaluation). The engine
gives the loaders the host half of a split transform (uint8 pixels, dgclip.data.transfer); the
device stage runs either here after collation (`device_stage=`, CPU runs) or in `Batch.to`.
Workers write their batches into recycled shared-memory slots (dgclip.data.shm_pool).

Reproducibility whatever the worker count: each training sample is augmented under its own seed,
seed_hash(run seed, step, index), set on the CPU generator of torch, on `random` and on numpy
right before its transform runs (in the main process, with 0 workers, the previous generator
states are restored after the batch, so dropout and the rest of the run never see the data RNG;
saved and restored once per batch, not per sample: numpy's state alone costs ~0.2 ms each way). The
batch indices come from the run's seeded generator in the main process; the sampler keeps that
generator's state after each step it has drawn, so a checkpoint taken while the workers are
already prefetching later steps still stores the state after the step being checkpointed, and
`--resume` continues bit-identically.
"""
from __future__ import annotations

import os
import random
from collections import deque
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .shm_pool import ReleasingIterator, SlotPool, shared_empty
from .splits import seed_hash

__all__ = ["default_workers", "SeededItems", "StepSampler", "train_loader", "eval_loader", "collate", "Collate"]


def default_workers() -> int:
    """Loader workers when none are asked for: one per CPU core available to this process (<= 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return min(8, n) if n > 1 else 0


def sample_seed(seed: int, step: int, index: int) -> int:
    return seed_hash(seed, "augment", int(step), int(index))


def _seed_all(seed: int) -> None:
    """Seed torch's CPU generator, `random` and numpy for one sample."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


class _MainProcessRNG:
    """Around a batch built in the main process: save the generators the samples reseed and restore
    them after, and run the samples on one intra-op thread as the workers do: the same arithmetic
    in every process, and no thread fan-out over one small image (under load, 2 threads made a
    GOPro sample 10x slower than 1 here). In a worker (its own process) there is nothing to keep."""

    def __init__(self):
        self.active = torch.utils.data.get_worker_info() is None

    def __enter__(self):
        if self.active:
            self.saved = (torch.default_generator.get_state(), random.getstate(), np.random.get_state(),
                          torch.get_num_threads())
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.default_generator.set_state(self.saved[0])
            random.setstate(self.saved[1])
            np.random.set_state(self.saved[2])
            torch.set_num_threads(self.saved[3])
        return False


class SeededItems(torch.utils.data.Dataset):
    """Items of `dataset` keyed by (step, index): item `index` augmented under sample_seed(seed, step, index)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def _item(self, key):
        step, index = key
        _seed_all(sample_seed(self.seed, step, index))
        return self.dataset[int(index)]

    def __getitem__(self, key):
        with _MainProcessRNG():
            return self._item(key)

    def __getitems__(self, keys):
        """A whole batch (what DataLoader fetches): the generators are saved/restored once."""
        with _MainProcessRNG():
            return [self._item(key) for key in keys]


class StepSampler(torch.utils.data.Sampler):
    """Yields, for each step in [start, steps), the list of (step, index) keys of its batch.

    draw(generator) -> 1-D index tensor is the run's batch sampling (called once per step, in
    order, in the main process). state_after(step) is the generator state once `step` is drawn.
    """

    def __init__(self, draw: Callable[[torch.Generator], torch.Tensor], generator: torch.Generator, start: int,
                 steps: int):
        self.draw, self.generator, self.start, self.steps = draw, generator, start, steps
        self._states: deque = deque()

    def __len__(self):
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.steps):
            idx = self.draw(self.generator)
            self._states.append((step, self.generator.get_state()))
            yield [(step, i) for i in idx.tolist()]

    def state_after(self, step: int) -> torch.Tensor:
        while self._states and self._states[0][0] < step:
            self._states.popleft()
        if not self._states or self._states[0][0] != step:
            raise KeyError(f"no generator state recorded for step {step}")
        return self._states[0][1]


def _collate_with(items: list, stack) -> tuple:
    """[(image or {view: image}, label, domain)] -> (images, labels [B], domains [B]), each
    view's images batched by stack(view, tensors)."""
    first = items[0][0]
    if isinstance(first, dict):
        images = {k: stack(k, [it[0][k] for it in items]) for k in first}
    else:
        images = stack(None, [it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    domains = torch.tensor([it[2] for it in items], dtype=torch.long)
    return images, labels, domains


def collate(items: list) -> tuple:
    """[(image or {view: image}, label, domain)] -> (images, labels [B], domains [B]), in this
    process's memory (the loaders with workers use Collate)."""
    return _collate_with(items, lambda _view, tensors: torch.stack(tensors))


class Collate:
    """collate, then (when given) the device stage of the images (dgclip.data.transfer): the loader
    finishes the images itself when the run's device is the CPU the workers run on.

    In a worker each view's batch is written straight into shared memory, which it must reach
    anyway to cross to the main process (one copy of the images less per batch); with a
    SlotPool (dgclip.data.shm_pool) into a recycled slot, and the batch gets a 4th item, the
    slots' tokens, which the loader's ReleasingIterator takes off again."""

    def __init__(self, device_stage=None, pool: Optional[SlotPool] = None):
        self.device_stage, self.pool = device_stage, pool

    def __call__(self, items: list) -> tuple:
        in_worker = torch.utils.data.get_worker_info() is not None
        pool = self.pool if in_worker else None
        tokens: dict = {}

        def out(view, shape, dtype):
            if pool is None:
                return shared_empty(shape, dtype) if in_worker else torch.empty(shape, dtype=dtype)
            tensor, tokens[view] = pool.take(shape, dtype)
            return tensor

        def batch(view, tensors):
            if self.device_stage is None:
                return torch.stack(tensors, out=out(view, (len(tensors), *tensors[0].shape), tensors[0].dtype))
            # the uint8 stack stays private (reused memory); the finished batch goes to shared memory
            x = torch.stack(tensors)
            return self.device_stage(x, out(view, self.device_stage.output_shape(x), torch.float32))

        images, labels, domains = _collate_with(items, batch)
        return (images, labels, domains) if self.pool is None else (images, labels, domains, tokens)


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers hand their batches over in recycled shared memory."""

    def __init__(self, *args, slot_pool: Optional[SlotPool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot_pool = slot_pool

    def __iter__(self):
        it = super().__iter__()
        return ReleasingIterator(it, self.slot_pool) if self.slot_pool is not None else it


def _worker_init(_worker_id: int) -> None:
    # One intra-op thread per worker: the workers are the parallelism (no oversubscription).
    torch.set_num_threads(1)


PREFETCH = 4
# slots per worker: every view of the PREFETCH batches in flight and of one or two in use,
# for up to 3 views (GOPro); beyond that a worker falls back to fresh segments
SLOTS_PER_WORKER = 3 * (PREFETCH + 2)


def _loader_kwargs(workers: int, pin: bool, persistent: bool, device_stage) -> dict:
    # Its own generator: starting an iterator draws a base seed, which must not come from (and
    # advance) the global RNG, or the run would depend on how often loaders are (re)started.
    kw = {"num_workers": workers, "pin_memory": pin, "collate_fn": Collate(device_stage) if device_stage else collate,
          "generator": torch.Generator().manual_seed(0)}
    if workers > 0:
        pool = SlotPool(workers, SLOTS_PER_WORKER)
        kw.update(persistent_workers=persistent, prefetch_factor=PREFETCH, worker_init_fn=_worker_init,
                  collate_fn=Collate(device_stage, pool), slot_pool=pool)
    return kw


def train_loader(dataset, seed: int, sampler: StepSampler, *, workers: int, pin: bool = False, device_stage=None):
    """Batches (images, labels, domains) of the sampler's steps, augmented in `workers` processes
    (and finished by `device_stage` after collation, when given)."""
    return _Loader(SeededItems(dataset, seed), batch_sampler=sampler, **_loader_kwargs(workers, pin, False, device_stage))


def eval_loader(dataset, batch_size: int, *, workers: int, pin: bool = False, persistent: Optional[bool] = None,
                device_stage=None):
    """Deterministic in-order batches (evaluation, feature extraction)."""
    # A worker only helps while the main process has a batch to work on: at most batches - 1
    # (a one-batch split is read in the main process; no start-up cost on small splits).
    workers = min(workers, max(0, -(-len(dataset) // batch_size) - 1))
    persistent = workers > 0 if persistent is None else persistent
    return _Loader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(workers, pin, persistent, device_stage))
