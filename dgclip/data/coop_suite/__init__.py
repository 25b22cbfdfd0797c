"""The CoOp few-shot benchmark suite (ImageNet + 10 fine-grained datasets + 4 ImageNet variants),
read as CoOp reads it: BENCHMARKS.md Part A.

    data = load_suite("caltech101", root)     # SuiteData: train/val/test Items, classnames, template
    report = verify_suite(root)               # for `dgclip datasets`
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..domainbed import DataError
from .items import Item, classnames_by_label
from .readers import SPECS, SuiteSpec, read
from .templates import template_for

__all__ = ["Item", "SuiteData", "SuiteSpec", "SPECS", "SUITE_DATASETS", "CROSS_DATASET_TARGETS",
           "IMAGENET_SHIFT_TARGETS", "load_suite", "verify_suite", "is_suite_dataset"]

# CoOp-suite names fixed by the shared contract (`--dataset`)
SUITE_DATASETS = tuple(SPECS)
# cross-dataset transfer: train on ImageNet, test on the 10 others (GOPro images/cd.png, CoOp's Table)
CROSS_DATASET_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                         "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
IMAGENET_SHIFT_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def is_suite_dataset(name: str) -> bool:
    return name in SPECS


@dataclass
class SuiteData:
    name: str
    dataset_dir: Path
    train: list
    val: list
    test: list
    classnames: list      # by label (Dassl: from the train list)
    template: str         # zero-shot template (CoOp trainers/zsclip.py)
    test_only: bool

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _spec(name: str) -> SuiteSpec:
    if name not in SPECS:
        raise DataError(f"unknown CoOp-suite dataset {name!r}; available: {', '.join(SPECS)}")
    return SPECS[name]


def load_suite(name: str, root, *, check_images: bool = True) -> SuiteData:
    spec = _spec(name)
    parts = read(spec, root, check_images=check_images)
    names = classnames_by_label(parts["train"] or parts["test"], f"{name} ({spec.split_file})")
    for part in ("val", "test"):
        extra = sorted({it.label for it in parts[part]} - set(range(len(names))))
        if extra:
            raise DataError(f"{name}: {part} has label(s) {extra[:5]} that train does not")
    return SuiteData(name, spec.path(root), parts["train"], parts["val"], parts["test"], names,
                     template_for(name), spec.test_only)


def verify_suite(root, *, check_images: bool = True) -> list[dict]:
    """One report per suite dataset: found or not, counts, or the problem (a missing split file or
    image, named)."""
    reports = []
    for name, spec in SPECS.items():
        rep = {"dataset": name, "path": str(spec.path(root)), "found": spec.path(root).is_dir(),
               "counts": {}, "num_classes": 0, "problems": []}
        if rep["found"]:
            try:
                data = load_suite(name, root, check_images=check_images)
                rep["counts"] = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
                rep["num_classes"] = data.num_classes
            except DataError as exc:
                rep["problems"].append(str(exc))
        reports.append(rep)
    return reports
