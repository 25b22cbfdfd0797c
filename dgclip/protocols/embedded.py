"""The embedded default in the CoOp suite's shape: rotated digits as a class-split dataset.

All 1,080 images of the rotated-digits tree (every rotation) are split per class into
50% train / 20% val / 30% test, as CoOp's helper splits a folder dataset (`datasets/dtd.py`
L54-95: shuffle each class, n_train = round(0.5 n), n_val = round(0.2 n), the rest test), with a
fixed shuffle seed so the split is one fixed file, like a `split_zhou_*.json`. Base-to-new then
cuts the sorted labels as everywhere: digits 0-4 base, 5-9 new.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..data.catalog import get_spec
from ..data.coop_suite import SuiteData
from ..data.coop_suite.items import Item
from ..data.domainbed import scan
from ..data.embedded import ensure_rotated_digits

__all__ = ["EMBEDDED_SUITE", "load_embedded", "SPLIT_SEED"]

EMBEDDED_SUITE = "rotated-digits"
SPLIT_SEED = 1  # project: one fixed split of the embedded tree (CoOp's split files are fixed, too)


def load_embedded(root) -> SuiteData:
    spec = get_spec(EMBEDDED_SUITE)
    base = ensure_rotated_digits(root)
    records = scan(root, spec)
    names = spec.classnames
    by_class: dict[int, list[str]] = {}
    for path, label in zip(records.paths, records.labels.tolist()):
        by_class.setdefault(label, []).append(path)
    rng = random.Random(SPLIT_SEED)
    train, val, test = [], [], []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        rng.shuffle(paths)
        n = len(paths)
        n_train, n_val = round(0.5 * n), round(0.2 * n)
        items = [Item(p, label, names[label]) for p in paths]
        train += items[:n_train]
        val += items[n_train:n_train + n_val]
        test += items[n_train + n_val:]
    return SuiteData(EMBEDDED_SUITE, Path(base), train, val, test, list(names), "a photo of a {}.", False)
