"""Readers of the CoOp few-shot suite, one per layout, each as CoOp's `datasets/<name>.py` reads it.

Every reader returns train / val / test lists of `Item`s (absolute paths) from
`<root>/<dataset_dir>/...` and raises `DataError` naming the missing split file, folder or image.
Line numbers refer to KaiyangZhou/CoOp at ff61507 (see BENCHMARKS.md Part A).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..domainbed import DataError
from .items import Item, check_exists, listdir_nohidden

__all__ = ["SuiteSpec", "SPECS", "read_split_json", "read_fgvc_aircraft", "read_imagenet",
           "read_imagenet_classnames", "read_imagenetv2", "read_sorted_wnids"]


@dataclass(frozen=True)
class SuiteSpec:
    name: str            # registry name (`--dataset`)
    dataset_dir: str     # folder under the root (CoOp's `dataset_dir`)
    image_dir: str       # folder under dataset_dir that split paths are relative to ("" = dataset_dir)
    split_file: str      # the file that defines the split ("" = built from folders)
    reader: str          # "split_json" | "fgvc_aircraft" | "imagenet" | "imagenetv2" | "sorted_wnids"
    test_only: bool = False
    source: str = ""     # CoOp file the layout comes from

    def path(self, root) -> Path:
        return Path(root) / self.dataset_dir


def _spec(name, ddir, idir, split, reader, src, test_only=False):
    return SuiteSpec(name, ddir, idir, split, reader, test_only, f"released: KaiyangZhou/CoOp/datasets/{src}")


SPECS = {s.name: s for s in (
    _spec("imagenet", "imagenet", "images", "classnames.txt", "imagenet", "imagenet.py:L63-91"),
    _spec("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "split_json",
          "caltech101.py:L19-35"),
    _spec("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "split_json",
          "oxford_pets.py:L122-138"),
    # StanfordCars' split paths start with cars_train/ or cars_test/: relative to the dataset dir (L24)
    _spec("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", "split_json",
          "stanford_cars.py:L20-30"),
    _spec("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "split_json",
          "oxford_flowers.py:L20-35"),
    _spec("food101", "food-101", "images", "split_zhou_Food101.json", "split_json", "food101.py:L14-27"),
    _spec("fgvc_aircraft", "fgvc_aircraft", "images", "variants.txt", "fgvc_aircraft", "fgvc_aircraft.py:L22-71"),
    _spec("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "split_json", "sun397.py:L17-36"),
    _spec("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "split_json", "dtd.py:L15-30"),
    _spec("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "split_json", "eurosat.py:L26-40"),
    _spec("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "split_json", "ucf101.py:L17-39"),
    _spec("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "classnames.txt", "imagenetv2",
          "imagenetv2.py:L20-46", test_only=True),
    _spec("imagenet_sketch", "imagenet-sketch", "images", "classnames.txt", "sorted_wnids",
          "imagenet_sketch.py:L20-43", test_only=True),
    _spec("imagenet_a", "imagenet-adversarial", "imagenet-a", "classnames.txt", "sorted_wnids",
          "imagenet_a.py:L8-46", test_only=True),
    _spec("imagenet_r", "imagenet-rendition", "imagenet-r", "classnames.txt", "sorted_wnids",
          "imagenet_r.py:L8-46", test_only=True),
)}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what}: {path} not found")
    return path


def read_split_json(spec: SuiteSpec, root, *, check_images: bool = True) -> dict[str, list[Item]]:
    """`split_zhou_*.json` read verbatim: {"train"|"val"|"test": [[relpath, label, classname], ...]}
    joined to the image dir (CoOp `oxford_pets.py` L122-138 read_split)."""
    ddir = _require(spec.path(root), spec.name)
    split_path = _require(ddir / spec.split_file, f"{spec.name}: split file")
    try:
        raw = json.loads(split_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{spec.name}: {split_path} is not valid JSON ({exc})") from exc
    prefix = ddir / spec.image_dir if spec.image_dir else ddir
    out = {}
    for part in ("train", "val", "test"):
        if not isinstance(raw, dict) or part not in raw:
            raise DataError(f"{spec.name}: {split_path} has no {part!r} list")
        items = []
        for i, entry in enumerate(raw[part]):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)):
                raise DataError(f"{spec.name}: {split_path} {part}[{i}] is not [path, label, classname]: {entry!r}")
            rel, label, name = entry
            items.append(Item(os.path.join(str(prefix), rel), int(label), str(name)))
        if check_images:
            check_exists(items, f"{spec.name} {part} ({split_path.name})")
        out[part] = items
    return out


def read_fgvc_aircraft(spec: SuiteSpec, root, *, check_images: bool = True) -> dict[str, list[Item]]:
    """label = line index in `variants.txt`; `images_variant_{train,val,test}.txt` lines are
    `<image id> <variant name...>`, the image `images/<id>.jpg` (CoOp `fgvc_aircraft.py` L22-71)."""
    ddir = _require(spec.path(root), spec.name)
    variants = _require(ddir / "variants.txt", f"{spec.name}: class list").read_text().splitlines()
    classnames = [v.strip() for v in variants]
    cname2lab = {c: i for i, c in enumerate(classnames)}
    out = {}
    for part in ("train", "val", "test"):
        f = _require(ddir / f"images_variant_{part}.txt", f"{spec.name}: split file")
        items = []
        for n, line in enumerate(f.read_text().splitlines()):
            tok = line.strip().split(" ")
            if not tok or not tok[0]:
                continue
            name = " ".join(tok[1:])
            if name not in cname2lab:
                raise DataError(f"{spec.name}: {f.name} line {n + 1}: variant {name!r} is not in variants.txt")
            items.append(Item(str(ddir / spec.image_dir / (tok[0] + ".jpg")), cname2lab[name], name))
        if check_images:
            check_exists(items, f"{spec.name} {part} ({f.name})")
        out[part] = items
    return out


def read_imagenet_classnames(path: Path) -> dict[str, str]:
    """`<wnid> <name words...>` per line -> ordered {wnid: name} (CoOp `imagenet.py` L63-72)."""
    names = {}
    for line in path.read_text().splitlines():
        tok = line.strip().split(" ")
        if tok and tok[0]:
            names[tok[0]] = " ".join(tok[1:])
    return names


def _folder_items(split_dir: Path, folders: list[str], label_of: Callable[[int, str], int],
                  name_of: Callable[[int, str], str]) -> list[Item]:
    items = []
    for i, folder in enumerate(folders):
        d = split_dir / folder
        if not d.is_dir():
            raise DataError(f"class folder {d} not found")
        # sorted: os.listdir's order depends on the file system, and few-shot sampling on the order
        for im in listdir_nohidden(d, sort=True):
            items.append(Item(str(d / im), label_of(i, folder), name_of(i, folder)))
    return items


def _classnames_file(spec: SuiteSpec, ddir: Path) -> dict[str, str]:
    return read_imagenet_classnames(_require(ddir / "classnames.txt", f"{spec.name}: class names file"))


def read_imagenet(spec: SuiteSpec, root, *, check_images: bool = True) -> dict[str, list[Item]]:
    """labels = index in the sorted folder list of `images/train` (and again of `images/val`);
    names from `classnames.txt`; val is the test set and there is no separate val
    (CoOp `imagenet.py` L61-91)."""
    ddir = _require(spec.path(root), spec.name)
    names = _classnames_file(spec, ddir)
    out = {}
    for part, sub in (("train", "train"), ("test", "val")):
        split_dir = _require(ddir / spec.image_dir / sub, f"{spec.name}: image folder")
        folders = listdir_nohidden(split_dir, sort=True)
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise DataError(f"{spec.name}: folder(s) {unknown[:3]} of {split_dir} are not in classnames.txt")
        out[part] = _folder_items(split_dir, folders, lambda i, f: i, lambda i, f: names[f])
    out["val"] = out["test"]
    return out


def read_imagenetv2(spec: SuiteSpec, root, *, check_images: bool = True) -> dict[str, list[Item]]:
    """Folder `str(L)` holds label L, named by the L-th line of `classnames.txt`
    (CoOp `imagenetv2.py` L31-46)."""
    ddir = _require(spec.path(root), spec.name)
    names = list(_classnames_file(spec, ddir).values())
    img = _require(ddir / spec.image_dir, f"{spec.name}: image folder")
    items = _folder_items(img, [str(i) for i in range(len(names))], lambda i, f: i, lambda i, f: names[i])
    return {"train": items, "val": [], "test": items}


def read_sorted_wnids(spec: SuiteSpec, root, *, check_images: bool = True) -> dict[str, list[Item]]:
    """Sorted wnid folders get labels 0..n-1 (ImageNet-A/-R: 200, Sketch: 1,000), `README.txt`
    dropped, names looked up by wnid (CoOp `imagenet_a.py` L32-46, `imagenet_sketch.py` L30-43)."""
    ddir = _require(spec.path(root), spec.name)
    names = _classnames_file(spec, ddir)
    img = _require(ddir / spec.image_dir, f"{spec.name}: image folder")
    folders = [f for f in listdir_nohidden(img, sort=True) if f != "README.txt"]
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"{spec.name}: folder(s) {unknown[:3]} of {img} are not in classnames.txt")
    items = _folder_items(img, folders, lambda i, f: i, lambda i, f: names[f])
    return {"train": items, "val": [], "test": items}


READERS: dict[str, Callable] = {"split_json": read_split_json, "fgvc_aircraft": read_fgvc_aircraft,
                                "imagenet": read_imagenet, "imagenetv2": read_imagenetv2,
                                "sorted_wnids": read_sorted_wnids}


def read(spec: SuiteSpec, root, *, check_images: bool = True) -> dict[str, list[Item]]:
    return READERS[spec.reader](spec, root, check_images=check_images)
