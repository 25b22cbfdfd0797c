"""Reading and verifying DomainBed-layout folders: ``<root>/<dirname>/<domain>/<class>/<image>``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .catalog import DatasetSpec
from .folder import IMAGE_EXTENSIONS

__all__ = ["DataError", "Records", "scan", "verify", "ImageDataset", "load_image", "IMAGE_EXTENSIONS"]


class DataError(RuntimeError):
    """The data on disk does not match what was asked for (missing root, wrong layout, ...)."""


@dataclass
class Records:
    """Every image of a dataset: paths and integer class / domain indices (catalogue order)."""

    paths: list[str]
    labels: np.ndarray   # int64 class index in spec.classes
    domains: np.ndarray  # int64 domain index in spec.domains

    def __len__(self):
        return len(self.paths)

    def subset(self, idx) -> "Records":
        idx = np.asarray(idx, dtype=np.int64)
        return Records([self.paths[i] for i in idx], self.labels[idx], self.domains[idx])


def _dataset_dir(root: os.PathLike, spec: DatasetSpec) -> Path:
    root = Path(root)
    if Path(spec.dirname).is_absolute():  # a dataset given by path: --root plays no part
        d = Path(spec.dirname)
        if not d.is_dir():
            raise DataError(f"{spec.name}: dataset folder {d} not found")
        return d
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (pass --root DIR, the folder that holds "
                        f"{spec.dirname}/)")
    d = root / spec.dirname
    if not d.is_dir():
        raise DataError(f"{spec.name}: folder {d} not found; expected the DomainBed layout "
                        f"{root}/{spec.dirname}/<domain>/<class>/<image>")
    return d


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan(root: os.PathLike, spec: DatasetSpec, domains: Optional[list[str]] = None) -> Records:
    """List every image of the named domains; raises DataError on layout problems."""
    base = _dataset_dir(root, spec)
    wanted = list(spec.domains) if domains is None else list(domains)
    paths, labels, doms = [], [], []
    for dom in wanted:
        if dom not in spec.domains:
            raise DataError(f"{spec.name}: unknown domain {dom!r}; domains are {list(spec.domains)}")
        ddir = base / dom
        if not ddir.is_dir():
            raise DataError(f"{spec.name}: domain folder {ddir} is missing (wrong layout? expected "
                            f"domains {list(spec.domains)})")
        present = {p.name for p in ddir.iterdir() if p.is_dir()}
        extra = sorted(present - set(spec.classes))
        if extra:
            raise DataError(f"{spec.name}/{dom}: unknown class folder(s) {extra[:5]} "
                            f"({len(extra)} in all); expected classes like {list(spec.classes[:5])}")
        d_idx = spec.domains.index(dom)
        for c_idx, cls in enumerate(spec.classes):
            if cls not in present:
                continue  # empty / missing classes are reported by verify(); DAML subsets skip them
            files = _images(ddir / cls)
            paths += files
            labels += [c_idx] * len(files)
            doms += [d_idx] * len(files)
    if not paths:
        raise DataError(f"{spec.name}: no images found under {base} for domains {wanted}")
    return Records(paths, np.asarray(labels, dtype=np.int64), np.asarray(doms, dtype=np.int64))


def verify(root: os.PathLike, spec: DatasetSpec, *, check_images: bool = True, cache_dir=None) -> dict:
    """A report for `dgclip datasets`: per domain image counts, every problem found (named), and
    every unreadable image with the reason (`errors`: what would stop a run)."""
    from .verify import find_unreadable

    base = Path(spec.dirname) if Path(spec.dirname).is_absolute() else Path(root) / spec.dirname
    report = {"dataset": spec.name, "path": str(base), "found": False, "domains": {}, "problems": [],
              "unreadable": [], "errors": 0}
    if not base.is_dir():
        return report
    report["found"] = True
    all_files = []
    for dom in spec.domains:
        ddir = base / dom
        if not ddir.is_dir():
            report["problems"].append(f"missing domain {dom!r}")
            report["errors"] += 1
            continue
        present = {p.name for p in ddir.iterdir() if p.is_dir()}
        for extra in sorted(present - set(spec.classes)):
            report["problems"].append(f"{dom}: unknown class folder {extra!r}")
            report["errors"] += 1
        n, empty = 0, []
        for cls in spec.classes:
            files = _images(ddir / cls) if cls in present else []
            if not files:
                empty.append(cls)
            all_files += files
            n += len(files)
        report["domains"][dom] = n
        if empty:  # not an error: open-set / DAML-style subsets leave classes out of some domains
            report["problems"].append(f"{dom}: {len(empty)} empty or missing class(es): "
                                      f"{', '.join(empty[:8])}{' ...' if len(empty) > 8 else ''}")
    if check_images and all_files:
        report["unreadable"] = bad = find_unreadable(all_files, cache_dir=cache_dir)
        report["errors"] += len(bad)
        if bad:
            report["problems"].append(f"{len(bad)} unreadable image(s), listed in 'unreadable' (e.g. {bad[0][0]})")
    return report


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"corrupt or unreadable image {path}: {exc}") from exc


class ImageDataset(torch.utils.data.Dataset):
    """(image, label, domain) items; labels may be remapped (open set: unknown -> C)."""

    def __init__(self, records: Records, transform: Callable, *, label_map: Optional[np.ndarray] = None,
                 domain_map: Optional[np.ndarray] = None):
        self.records = records
        self.transform = transform
        self.labels = records.labels if label_map is None else label_map[records.labels]
        self.domains = records.domains if domain_map is None else domain_map[records.domains]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        img = self.transform(load_image(self.records.paths[i]))
        return img, int(self.labels[i]), int(self.domains[i])
