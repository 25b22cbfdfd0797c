"""Any DomainBed-layout folder is a dataset: ``<folder>/<domain>/<class>/<image>``.

Domains are the folder's sub-folders and classes the union of the domains' sub-folders, both in
sorted order (what torchvision's ImageFolder and DomainBed use for class indices). A domain may
lack a class (DAML-style subsets); every domain must hold at least one class folder with images.
Hidden entries (a leading '.') are ignored, as are files that are not images.
"""
from __future__ import annotations

import os
from pathlib import Path

from .catalog import DatasetSpec, UnknownDatasetError

__all__ = ["folder_spec", "inspect_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.iterdir())


def inspect_folder(path: os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """(domains, classes, problems): problems say why the folder is not a DomainBed-layout
    dataset (empty when it is one)."""
    base = Path(path)
    if not base.is_dir():
        return [], [], [f"{base} is not a folder"]
    domains = _subdirs(base)
    problems = []
    if len(domains) < 2:
        loose = _has_image(base)
        problems.append(f"{len(domains)} domain folder(s); a DG dataset needs at least 2 "
                        f"(<folder>/<domain>/<class>/<image>)" + ("; it holds images directly" if loose else ""))
        return [d.name for d in domains], [], problems
    classes = set()
    for dom in domains:
        cls_dirs = _subdirs(dom)
        with_images = [c for c in cls_dirs if _has_image(c)]
        if not cls_dirs:
            problems.append(f"domain {dom.name!r} has no class folders"
                            + (" (it holds images directly: expected <domain>/<class>/<image>)"
                               if _has_image(dom) else ""))
        elif not with_images:
            problems.append(f"domain {dom.name!r}: none of its {len(cls_dirs)} class folder(s) holds an image "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        classes.update(c.name for c in cls_dirs)
    return [d.name for d in domains], sorted(classes), problems


def folder_spec(path: os.PathLike) -> DatasetSpec:
    """The DatasetSpec of a DomainBed-layout folder (raises UnknownDatasetError, naming why not)."""
    base = Path(os.path.expanduser(str(path))).resolve()
    if not base.exists():
        raise UnknownDatasetError(f"dataset folder {path} does not exist")
    domains, classes, problems = inspect_folder(base)
    if problems:
        raise UnknownDatasetError(f"{path} is not a DomainBed-layout dataset: " + "; ".join(problems))
    # dirname is absolute: <root>/<absolute path> is that path, so every reader ignores --root
    return DatasetSpec(base.name, str(base), tuple(domains), tuple(classes))
