"""Post-extraction steps: turn what the official archives unpack into the layout the loaders read.

Each builder gets ``raw`` (every archive of the dataset unpacked there, plain files copied there by
their file name) and ``out`` (the dataset folder to create, inside the same staging folder) and
``ctx`` (the data root, for builders that read another installed dataset, and a list of notes that
go into the download manifest). They follow DomainBed's ``scripts/download.py`` and the CoOp
``DATASETS.md`` instructions (BENCHMARKS.md B1, A1).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .remote import DownloadError

__all__ = ["BuildContext", "moves", "terra_incognita", "domain_net", "digits_dg", "mini_domainnet", "sun397",
           "TERRA_LOCATIONS", "TERRA_CATEGORIES", "TERRA_ANNOTATION_FILES"]


@dataclass
class BuildContext:
    root: Path
    notes: list = field(default_factory=list)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "") if names else "nothing"


def _need(raw: Path, rel: str, what: str) -> Path:
    p = raw / rel
    if not p.exists():
        raise DownloadError(f"the archive(s) of {what} have no {rel!r} (unpacked: {_listing(raw)}); "
                            "the file is not the expected archive (a different release or a wrong mirror copy)")
    return p


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def moves(pairs: Iterable[tuple[str, str]]) -> Callable:
    """A builder that renames raw/<src> to out/<dst> for each pair (dst "" = out itself)."""
    pairs = tuple(pairs)

    def build(raw: Path, out: Path, ctx: BuildContext, what: str = "the dataset") -> None:
        found = [(_need(raw, src, what), dst) for src, dst in pairs]  # every source checked before any move
        for src, dst in found:
            _move(src, out / dst if dst else out)

    build.pairs = pairs
    return build


# DomainBed download.py L185-262 (commit 3cf2e20): five annotation files, four locations, ten classes.
TERRA_ANNOTATION_FILES = ("cis_test", "cis_val", "train", "trans_test", "trans_val")
TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CATEGORIES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")


def terra_incognita(raw: Path, out: Path, ctx: BuildContext, what: str = "TerraIncognita") -> None:
    """Rebuild ``location_<loc>/<category>/<file>`` from the camera-trap annotations (DomainBed).

    An image with annotations of two kept categories is placed in both folders, as DomainBed does;
    the lookup is a dictionary from image id (DomainBed scans every annotation per image)."""
    images_dir = _need(raw, "eccv_18_all_images_sm", what)
    ann_dir = _need(raw, "eccv_18_annotation_files", what)
    data = {"images": [], "annotations": [], "categories": []}
    for stem in TERRA_ANNOTATION_FILES:
        path = _need(ann_dir, f"{stem}_annotations.json", what)
        try:
            part = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DownloadError(f"{what}: {path.name} is not valid JSON ({exc})") from exc
        for key in data:
            data[key].extend(part.get(key, []))
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(names.get(ann["category_id"]))
    placed, missing = 0, 0
    for img in data["images"]:
        loc = str(img.get("location"))
        if loc not in TERRA_LOCATIONS:
            continue
        src = images_dir / img["file_name"]
        for cat in sorted(set(by_image.get(img["id"], []))):
            if cat not in TERRA_CATEGORIES:
                continue
            if not src.is_file():
                missing += 1
                continue
            _link_or_copy(src, out / f"location_{loc}" / cat / Path(img["file_name"]).name)
            placed += 1
    if placed == 0:
        raise DownloadError(f"{what}: no image of locations {TERRA_LOCATIONS} and the ten classes was found; "
                            "the archives are not the ECCV'18 camera-trap release")
    ctx.notes.append(f"TerraIncognita rebuilt from annotations: {placed} images placed"
                     + (f", {missing} annotated images absent from the image archive" if missing else ""))


DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def domain_net(raw: Path, out: Path, ctx: BuildContext, what: str = "DomainNet") -> None:
    """Move the six domain folders into place and delete DomainBed's listed duplicates."""
    for dom in DOMAINNET_DOMAINS:
        _move(_need(raw, dom, what), out / dom)
    dup_list = _need(raw, "domain_net_duplicates.txt", what)
    removed = 0
    for line in dup_list.read_text().splitlines():
        rel = line.strip()
        if not rel:
            continue
        target = (out / rel).resolve()
        if out.resolve() not in target.parents:
            raise DownloadError(f"{what}: duplicate list entry {rel!r} points outside the dataset")
        try:
            target.unlink()
            removed += 1
        except OSError:  # DomainBed ignores entries that are already gone
            pass
    ctx.notes.append(f"DomainNet: {removed} duplicate images removed (DomainBed's domain_net_duplicates.txt)")


DIGITS_DG_DOMAINS = ("mnist", "mnist_m", "svhn", "syn")


def digits_dg(raw: Path, out: Path, ctx: BuildContext, what: str = "Digits-DG") -> None:
    """Dassl's ``<domain>/{train,val}/<class>/`` merged into the DomainBed layout
    ``<domain>/<class>/<split>_<file>`` (the split name kept in the file name: the project splits
    80/20 by DomainBed's rule, and Dassl's split stays recoverable)."""
    base = _need(raw, "digits_dg", what)
    for dom in DIGITS_DG_DOMAINS:
        ddir = _need(base, dom, what)
        for split in ("train", "val"):
            sdir = _need(ddir, split, what)
            for cls_dir in sorted(p for p in sdir.iterdir() if p.is_dir()):
                for f in sorted(cls_dir.iterdir()):
                    _move(f, out / dom / cls_dir.name / f"{split}_{f.name}")
    ctx.notes.append("Digits-DG: train/ and val/ merged per class; file names keep the Dassl split as a prefix")


MINI_DOMAINS = ("clipart", "painting", "real", "sketch")


def mini_domainnet(raw: Path, out: Path, ctx: BuildContext, what: str = "Mini-DomainNet") -> None:
    """Link the images named by Dassl's mini-DomainNet split lists out of the installed DomainNet
    into ``<domain>/<class>/<file>`` (hard links where the filesystem allows, else copies)."""
    lists = [p for p in raw.rglob("*.txt") if p.stem.split("_")[0] in MINI_DOMAINS]
    if not lists:
        raise DownloadError(f"{what}: no split lists <domain>_<train|test>.txt in the archive (unpacked: "
                            f"{_listing(raw)})")
    src_root = ctx.root / "domain_net"
    placed, missing = 0, []
    for lst in sorted(lists):
        for line in lst.read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            parts = Path(rel).parts
            if len(parts) != 3 or parts[0] not in MINI_DOMAINS:
                raise DownloadError(f"{what}: {lst.name}: unexpected line {line!r} (want '<domain>/<class>/<file> <label>')")
            dst = out / rel
            if dst.exists():
                continue
            src = src_root / rel
            if not src.is_file():
                missing.append(rel)
                continue
            _link_or_copy(src, dst)
            placed += 1
    shutil.copytree(lists[0].parent, out / "splits_mini", dirs_exist_ok=True)
    ctx.notes.append(f"Mini-DomainNet: {placed} images linked from {src_root}"
                     + (f"; {len(missing)} listed images not in DomainNet (e.g. removed duplicates: "
                        f"{missing[0]})" if missing else ""))


def sun397(raw: Path, out: Path, ctx: BuildContext, what: str = "SUN397") -> None:
    """``SUN397/`` from the image archive; the partition text files from Partitions.zip (wherever
    in it they lie) next to it, as CoOp's DATASETS.md lays them out."""
    _move(_need(raw, "SUN397", what), out / "SUN397")
    _move(_need(raw, "split_zhou_SUN397.json", what), out / "split_zhou_SUN397.json")
    for name in ("ClassName.txt", "Training_01.txt", "Testing_01.txt"):
        hits = [p for p in raw.rglob(name)]
        if not hits:
            raise DownloadError(f"{what}: Partitions.zip has no {name} (unpacked: {_listing(raw)})")
        _move(hits[0], out / name)
