"""Bounded on-disk cache of frozen image features.

Layout: one folder per key (model, dataset, files of the split, transform, requested fields,
storage dtype) holding shards of SHARD_ITEMS items, each field of a shard one .npy file written
atomically (temp file + rename), and `meta.json` once every shard is there. Features are stored
in half precision (float16: CLIP embeddings are O(1) per coordinate, well inside its range, with
a 2^-11 relative rounding that is far below what a frozen feature carries) and read back through
memory maps, so a split never has to fit in RAM: `CachedFeatures.index` gathers one batch and
returns float32. An interrupted extraction keeps its finished shards and resumes from them.

Size budget: `plan_cache` estimates the bytes a run's splits would take (one forward on a
single image gives the per-item size); above the budget nothing is cached and the run computes
features on the fly (the frozen tower runs every step). The plan goes into the run record.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..backbone import CLIPBackbone, ImageFeatures

__all__ = ["feature_cache_key", "compute_features", "CachedFeatures", "plan_cache", "CachePlan",
           "STORAGE_DTYPE", "SHARD_ITEMS", "DEFAULT_BUDGET_GB"]

FORMAT = "memmap-shards-v1"
STORAGE_DTYPE = np.float16
SHARD_ITEMS = 4096
DEFAULT_BUDGET_GB = 64.0
_FIELDS = [f.name for f in fields(ImageFeatures)]


def feature_cache_key(backbone: CLIPBackbone, dataset: str, paths: list[str], transform, *,
                      patches: bool, layer_stats: bool, weights_id: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps([backbone.name, backbone.pretrained, weights_id, dataset, repr(transform),
                         patches, layer_stats, FORMAT, np.dtype(STORAGE_DTYPE).name]).encode())
    h.update("\n".join(paths).encode())
    return h.hexdigest()[:24]


class CachedFeatures:
    """Memory-mapped feature shards; `index(idx)` -> ImageFeatures (float32) of those items."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder, self.n, self.shard_items = folder, int(meta["n"]), int(meta["shard_items"])
        self.fields = list(meta["fields"])
        self.shards = [{f: np.load(folder / _shard_name(i, f), mmap_mode="r") for f in self.fields}
                       for i in range(_n_shards(self.n, self.shard_items))]
        self.nbytes = int(meta["bytes"])

    def __len__(self) -> int:
        return self.n

    def index(self, idx) -> ImageFeatures:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"feature index out of range [0, {self.n})")
        shard, pos = np.divmod(idx, self.shard_items)
        out = {}
        for f in self.fields:
            first = self.shards[0][f]
            buf = np.empty((idx.size,) + first.shape[1:], dtype=first.dtype)
            for s in np.unique(shard):
                sel = shard == s
                buf[sel] = self.shards[s][f][pos[sel]]
            out[f] = torch.from_numpy(buf).float()
        return ImageFeatures(**{f: out.get(f) for f in _FIELDS})

    def to(self, *args, **kwargs) -> ImageFeatures:
        return self.index(torch.arange(self.n)).to(*args, **kwargs)


def _shard_name(i: int, field: str) -> str:
    return f"shard{i:05d}.{field}.npy"


def _n_shards(n: int, per: int) -> int:
    return max(1, -(-n // per))


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _extract(backbone, dataset, *, batch_size, patches, layer_stats, workers, pin, progress,
             device_stage) -> ImageFeatures:
    from tqdm.auto import tqdm

    from .loader import eval_loader
    from .transfer import finish_images, stage_in_loader

    in_loader = stage_in_loader(backbone.device)
    loader = eval_loader(dataset, batch_size, workers=workers, pin=pin, persistent=False,
                         device_stage=device_stage if in_loader else None)
    out = []
    for images, _, _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        images = finish_images(images.to(backbone.device, non_blocking=True), None if in_loader else device_stage)
        out.append(backbone.image_features(images, patches=patches, layer_stats=layer_stats).to("cpu"))
    return ImageFeatures.cat(out)


def compute_features(backbone: CLIPBackbone, dataset, *, batch_size: int = 256, patches=False,
                     layer_stats=False, cache_dir: Path | None = None, key: str | None = None,
                     progress: bool = False, workers: int = 0, pin: bool = False, device_stage=None):
    """Features of every item of `dataset` ((image, label, domain) items).

    device_stage: what the loader's images still need on the device (`dgclip.data.transfer`);
    the cache key is the caller's, from the whole transform (the features do not depend on where
    the normalisation ran).

    With cache_dir and key: CachedFeatures (memory-mapped float16 shards, resumed if partial);
    without: ImageFeatures in memory (float32).
    """
    if cache_dir is None or not key:
        return _extract(backbone, dataset, batch_size=batch_size, patches=patches, layer_stats=layer_stats,
                        workers=workers, pin=pin, progress=progress, device_stage=device_stage)
    folder = Path(cache_dir) / key
    if (folder / "meta.json").exists():
        return CachedFeatures(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    total, names = 0, None
    for i in range(_n_shards(n, SHARD_ITEMS)):
        lo, hi = i * SHARD_ITEMS, min(n, (i + 1) * SHARD_ITEMS)
        marker = folder / f"shard{i:05d}.done"
        if marker.exists():  # finished by an earlier (interrupted) extraction
            names = json.loads(marker.read_text())
            total += sum(np.load(folder / _shard_name(i, f), mmap_mode="r").nbytes for f in names)
            continue
        sub = torch.utils.data.Subset(dataset, range(lo, hi))
        feats = _extract(backbone, sub, batch_size=batch_size, patches=patches, layer_stats=layer_stats,
                         workers=workers, pin=pin, progress=progress, device_stage=device_stage)
        names = [f for f in _FIELDS if getattr(feats, f) is not None]
        for f in names:
            arr = getattr(feats, f).float().numpy().astype(STORAGE_DTYPE)
            _save_npy(folder / _shard_name(i, f), arr)
            total += arr.nbytes
        marker.write_text(json.dumps(names))
    meta = {"n": n, "shard_items": SHARD_ITEMS, "fields": names or ["pooled"], "dtype": np.dtype(STORAGE_DTYPE).name,
            "format": FORMAT, "bytes": total}
    tmp = folder / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, folder / "meta.json")
    return CachedFeatures(folder)


@dataclass
class CachePlan:
    """Whether a run caches features, and why (recorded in the run record)."""

    mode: str                 # "memmap-float16" | "on-the-fly" | "off"
    estimated_bytes: int = 0
    budget_bytes: int = 0
    reason: str = ""

    @property
    def cached(self) -> bool:
        return self.mode != "on-the-fly" and self.mode != "off"

    def describe(self) -> dict:
        return {"mode": self.mode, "estimated_bytes": self.estimated_bytes, "budget_bytes": self.budget_bytes,
                "storage_dtype": np.dtype(STORAGE_DTYPE).name if self.cached else None, "format": FORMAT,
                "reason": self.reason}


def plan_cache(backbone: CLIPBackbone, dataset, n_items: int, *, patches: bool, layer_stats: bool,
               budget_gb: Optional[float]) -> CachePlan:
    """Estimate the cache of `n_items` items (one forward on dataset[0]) against the budget."""
    budget = int((DEFAULT_BUDGET_GB if budget_gb is None else budget_gb) * 2 ** 30)
    if n_items == 0 or len(dataset) == 0:
        return CachePlan("memmap-float16", 0, budget)
    image = dataset[0][0]
    with torch.no_grad():
        one = backbone.image_features(image[None], patches=patches, layer_stats=layer_stats)
    per_item = sum(getattr(one, f)[0].numel() for f in _FIELDS if getattr(one, f) is not None)
    est = per_item * np.dtype(STORAGE_DTYPE).itemsize * n_items
    if est > budget:
        return CachePlan("on-the-fly", est, budget,
                         f"estimated cache {est / 2 ** 30:.2f} GiB exceeds the budget {budget / 2 ** 30:.2f} GiB: "
                         "features are computed on the fly")
    return CachePlan("memmap-float16", est, budget)
