"""Base-to-new class split, as CoOp's `subsample_classes` (`datasets/oxford_pets.py` L140-186).

The label set comes from the FIRST list passed (the few-shot train list), sorted; base = the first
m = ceil(n/2) labels, new = the rest (odd n: base gets the extra class). Labels are remapped to
0..len(selected)-1 in sorted order; items of other labels are dropped; names are kept. The same
selection applies to every list passed (train, val, test).
"""
from __future__ import annotations

import math

from ..data.coop_suite.items import Item

__all__ = ["split_labels", "subsample_classes", "harmonic_mean"]


def split_labels(labels) -> tuple[list[int], list[int]]:
    """(base, new) label lists: sorted labels cut at ceil(n/2)."""
    labels = sorted(set(int(l) for l in labels))
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


def subsample_classes(*lists: list[Item], subsample: str = "all") -> tuple[list, ...]:
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return lists
    base, new = split_labels(it.label for it in lists[0])
    selected = base if subsample == "base" else new
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([Item(it.impath, relabel[it.label], it.classname) for it in items if it.label in relabel]
                 for items in lists)


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2 b n / (b + n), as the base-to-new tables report it (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
