"""Generated CoOp-suite trees (tiny PNGs) in each dataset's layout, with split files written as
CoOp writes them: used by the CoOp-suite tests, never real data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path, format="PNG")


def _json_split(ddir: Path, image_dir: str, split_file: str, classes: list[tuple[str, str]],
                per_class=(4, 2, 3)) -> dict:
    """classes: (folder, classname) in label order; writes images and the split JSON."""
    prefix = ddir / image_dir if image_dir else ddir
    split = {"train": [], "val": [], "test": []}
    n = 0
    for label, (folder, name) in enumerate(classes):
        for part, k in zip(("train", "val", "test"), per_class):
            for i in range(k):
                rel = f"{folder}/{part}_{i:03d}.png"
                _png(prefix / rel, n)
                n += 1
                split[part].append([rel, label, name])
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / split_file).write_text(json.dumps(split, indent=4))
    return split


CALTECH_FOLDERS = ["Faces", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant"]


def make_caltech101(root: Path, folders=CALTECH_FOLDERS, per_class=(4, 2, 3)) -> dict:
    from dgclip.data.coop_suite.classnames import caltech101_name

    return _json_split(root / "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                       [(f, caltech101_name(f)) for f in folders], per_class)


def make_json_datasets(root: Path) -> dict:
    """Every split-JSON dataset with 3 classes; returns {name: expected classnames}."""
    from dgclip.data.coop_suite.classnames import eurosat_name, sun397_name, ucf101_name

    out = {"caltech101": [n for n in ("face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant")]}
    make_caltech101(root)
    specs = {
        "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                        [("abyssinian", "abyssinian"), ("beagle", "beagle"), ("pug", "pug")]),
        "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                          [("cars_train", "2012 AM General Hummer SUV"), ("cars_test", "2012 Acura RL Sedan"),
                           ("cars_train2", "2007 BMW X5 SUV")]),
        "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                           [("a", "pink primrose"), ("b", "hard-leaved pocket orchid"), ("c", "canterbury bells")]),
        "food101": ("food-101", "images", "split_zhou_Food101.json",
                    [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava")]),
        "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
                   [(p.lstrip("/"), sun397_name(p)) for p in ("/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop")]),
        "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
                [("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided")]),
        "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                    [(f, eurosat_name(f)) for f in ("AnnualCrop", "Forest", "SeaLake")]),
        "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                   [(ucf101_name(a), ucf101_name(a)) for a in ("ApplyEyeMakeup", "Archery", "BabyCrawling")]),
    }
    for name, (ddir, idir, sfile, classes) in specs.items():
        _json_split(root / ddir, idir, sfile, classes)
        out[name] = [c[1] for c in classes]
    return out


def make_fgvc_aircraft(root: Path) -> list[str]:
    d = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for part, k in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for v in variants:
            for _ in range(k):
                img = f"{1000000 + n:07d}"
                _png(d / "images" / f"{img}.jpg", n)
                n += 1
                lines.append(f"{img} {v}")
        (d / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return variants


IMAGENET_WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
                  "n01491361": "tiger shark"}


def _classnames_txt(d: Path, names: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in names.items()))


def make_imagenet_family(root: Path, per_class: int = 3) -> None:
    wnids = list(IMAGENET_WNIDS)
    d = root / "imagenet"
    _classnames_txt(d, IMAGENET_WNIDS)
    n = 0
    for sub in ("train", "val"):
        for w in reversed(wnids):  # written out of order: labels must come from the sorted folders
            for i in range(per_class):
                _png(d / "images" / sub / w / f"{w}_{sub}_{i}.JPEG", n)
                n += 1
    v2 = root / "imagenetv2"
    _classnames_txt(v2, IMAGENET_WNIDS)
    for label in range(len(wnids)):
        for i in range(2):
            _png(v2 / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg", 500 + n)
            n += 1
    for ddir, idir, subset in (("imagenet-sketch", "images", wnids), ("imagenet-adversarial", "imagenet-a", wnids[1:3]),
                               ("imagenet-rendition", "imagenet-r", wnids[::2])):
        base = root / ddir
        _classnames_txt(base, IMAGENET_WNIDS)
        for w in subset:
            for i in range(2):
                _png(base / idir / w / f"{i}.png", 900 + n)
                n += 1
        (base / idir).mkdir(parents=True, exist_ok=True)
        (base / idir / "README.txt").write_text("not a class\n")
