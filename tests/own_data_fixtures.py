"""A researcher's own DomainBed-layout tree, written from seeded noise (no download)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DOMAINS = ("day", "fog", "night")
CLASSES = ("cat", "dog", "fox")
TINY = ["--backbone", "tiny-digits", "--pretrained", "none", "--no-progress", "--workers", "0"]
COOP = '{"batch_size": 4, "n_ctx": 4}'


def make_tree(folder: Path, domains=DOMAINS, classes=CLASSES, per_class: int = 5, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.RandomState(seed)
    for d in domains:
        for ci, c in enumerate(classes):
            out = folder / d / c
            out.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (rng.rand(32, 32, 3) * 80 + ci * 60).astype(np.uint8)
                Image.fromarray(pixels).save(out / f"{i}.png")
    return folder


def corrupt(path: Path) -> Path:
    """A PNG cut in half: its header opens, its pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
