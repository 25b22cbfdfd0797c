"""Few-shot sampling as Dassl's `generate_fewshot_dataset`, seeded and cached as JSON.

Dassl (`dassl/data/datasets/base_dataset.py` L167-223): group the items by label in first-seen
order; per label draw `random.sample(items, k)` (without replacement), or keep all items of a label
with fewer than k (`repeat=False`, what every CoOp dataset uses). CoOp seeds Python's global
`random` with the run seed before the dataset is built (`CoOp train.py` L130-132) and samples train
(k shots) then val (min(k, 4) shots) from that one stream (`oxford_pets.py` L33-49; ImageNet: train
only, `imagenet.py` L41-56). Here the stream is a private `random.Random(seed)`, which yields the
same draws as the seeded global one, so a (dataset, k, seed) triple picks the same images as CoOp
for the same input list, on any machine and with any number of loader workers (sampling happens
once, in the main process, before any loader exists).

CoOp caches the draw as a pickle of absolute paths; here it is JSON with paths relative to the
dataset folder plus a fingerprint of the full split it was drawn from, so a cache made from a
different split file is refused instead of silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Optional

from .coop_suite.items import Item
from .domainbed import DataError

__all__ = ["generate_fewshot", "val_shots", "fewshot_split", "split_fingerprint"]

FORMAT = "dgclip-fewshot-v1"


def val_shots(k: int) -> int:
    """Few-shot val size per class: min(k, 4) (CoOp `oxford_pets.py` L45)."""
    return min(int(k), 4)


def generate_fewshot(items: list[Item], k: int, rng: random.Random, *, repeat: bool = False) -> list[Item]:
    """Dassl's generate_fewshot_dataset for one source list (k < 1: the list unchanged)."""
    if k < 1:
        return list(items)
    by_label: dict[int, list[Item]] = {}
    for it in items:  # first-seen label order, as Dassl's defaultdict
        by_label.setdefault(it.label, []).append(it)
    out = []
    for group in by_label.values():
        if len(group) >= k:
            out.extend(rng.sample(group, k))
        elif repeat:
            out.extend(rng.choices(group, k=k))
        else:
            out.extend(group)
    return out


def split_fingerprint(train: list[Item], val: list[Item], base_dir: Path) -> str:
    """Of the split as listed relative to the dataset folder: a moved dataset keeps its cache."""
    h = hashlib.sha256()
    for part in (train, val):
        for it in part:
            h.update(f"{os.path.relpath(it.impath, base_dir)}\0{it.label}\0{it.classname}\n".encode())
        h.update(b"|")
    return h.hexdigest()[:20]


def _rel(items: list[Item], base: Path) -> list[list]:
    return [[os.path.relpath(it.impath, base), it.label, it.classname] for it in items]


def _abs(rows: list[list], base: Path) -> list[Item]:
    return [Item(str(base / r[0]), int(r[1]), str(r[2])) for r in rows]


def fewshot_split(dataset: str, train: list[Item], val: list[Item], k: int, seed: int, *,
                  base_dir: Path, cache_dir: Optional[Path] = None, sample_val: bool = True) -> dict:
    """{"train": [...], "val": [...]} few-shot lists for (dataset, k, seed), cached as JSON.

    sample_val False (ImageNet): val is not sampled (it is the test set) and comes back as given.
    The cache file is `<cache_dir>/<dataset>/shot_{k}-seed_{seed}.json`."""
    k, seed = int(k), int(seed)
    if k < 1:
        raise ValueError(f"shots must be >= 1, got {k}")
    base_dir = Path(base_dir)
    fp = split_fingerprint(train, val if sample_val else [], base_dir)
    path = Path(cache_dir) / dataset / f"shot_{k}-seed_{seed}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"few-shot cache {path} is corrupt ({exc}); delete it to resample") from exc
        if stored.get("format") != FORMAT or stored.get("fingerprint") != fp:
            raise DataError(f"few-shot cache {path} was drawn from another split of {dataset} "
                            "(its fingerprint differs); delete it to resample")
        out = {"train": _abs(stored["train"], base_dir)}
        out["val"] = _abs(stored["val"], base_dir) if sample_val else list(val)
        out["cache"] = str(path)
        return out
    rng = random.Random(seed)
    few_train = generate_fewshot(train, k, rng)
    few_val = generate_fewshot(val, val_shots(k), rng) if sample_val else list(val)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "dataset": dataset, "shots": k, "seed": seed, "fingerprint": fp,
               "train": _rel(few_train, base_dir), "val": _rel(few_val, base_dir) if sample_val else []}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)  # never a half-written cache
    return {"train": few_train, "val": few_val, "cache": str(path) if path else None}
