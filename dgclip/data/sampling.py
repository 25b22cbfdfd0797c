"""Index sampling for training batches and for evaluation order.

DomainBed (and DPL) draw `batch_size` images from EACH source domain per step, so per-domain
statistics (DPL's domain-mean tokens, DALSCLIP's domain heads) always see every domain with a
full batch. Evaluation order is a seeded permutation keyed on each image's path, so it neither
follows the class-by-class file listing nor depends on the order records arrive in: a method
that pools over its test batch (transductive) sees the same seeded random batches whatever the
listing order, never class-sorted chunks.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["DomainBalancedBatches", "eval_order"]


class DomainBalancedBatches:
    """Per step: `batch_size` indices drawn with replacement from each source domain.

    domains: [N] long source-domain index of every training item (0..S-1). The indices of one
    step are domain 0's block, then domain 1's, ...; the generator is the only state, so
    checkpointing `generator.get_state()` resumes the same stream. Iterable (an endless batch
    sampler) as well as callable through `draw()`.
    """

    def __init__(self, domains, batch_size: int, generator: torch.Generator):
        domains = torch.as_tensor(domains, dtype=torch.long)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if domains.numel() == 0:
            raise ValueError("no training items to draw batches from")
        if int(domains.min()) < 0:
            raise ValueError("training items must all belong to a source domain (index >= 0)")
        self.groups = [torch.nonzero(domains == d).flatten() for d in range(int(domains.max()) + 1)]
        empty = [d for d, g in enumerate(self.groups) if g.numel() == 0]
        if empty:
            raise ValueError(f"source domain(s) {empty} have no training items")
        self.batch_size = int(batch_size)
        self.generator = generator

    @property
    def num_domains(self) -> int:
        return len(self.groups)

    def draw(self) -> torch.Tensor:
        return torch.cat([g[torch.randint(g.numel(), (self.batch_size,), generator=self.generator)]
                          for g in self.groups])

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.draw()


def eval_order(paths: Sequence[str], seed: int) -> np.ndarray:
    """A seeded permutation of range(len(paths)) that depends only on the paths' contents.

    Sorting by md5(seed, path) gives the same batches for any listing order of the same files.
    """
    keys = [hashlib.md5(f"{seed}|{p}".encode()).digest() for p in paths]
    return np.asarray(sorted(range(len(paths)), key=keys.__getitem__), dtype=np.int64)
