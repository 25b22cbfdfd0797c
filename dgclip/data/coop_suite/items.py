"""One labelled image of the CoOp suite, and the checks every reader shares.

`Item` is Dassl's `Datum` reduced to what the suite uses: an absolute image path, an integer label
and a class name (Dassl `dassl/data/datasets/base_dataset.py` L22-29). Dassl asserts that every
image exists when a dataset is built; `check_exists` does the same but names the first missing
files instead of failing on an assertion.
"""
from __future__ import annotations

import os
from typing import NamedTuple

from ..domainbed import DataError

__all__ = ["Item", "check_exists", "classnames_by_label", "listdir_nohidden"]


class Item(NamedTuple):
    impath: str
    label: int
    classname: str


def listdir_nohidden(path: os.PathLike, sort: bool = False) -> list[str]:
    """Entries of a folder whose names do not start with "." (Dassl `tools.py` listdir_nohidden)."""
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    return sorted(names) if sort else names


def check_exists(items: list[Item], what: str) -> None:
    """Every image must exist (Dassl asserts it per Datum): name the missing ones."""
    missing = [it.impath for it in items if not os.path.isfile(it.impath)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{what}: {len(missing)} image(s) listed but missing, e.g. "
                        f"{', '.join(missing[:3])}{more}")


def classnames_by_label(items: list[Item], what: str) -> list[str]:
    """Names ordered by label, num_classes = max label + 1 (Dassl `base_dataset.py` L58-120).

    A label without a name, or one label carrying two names, is an error here (Dassl would
    silently keep the last name seen)."""
    names: dict[int, str] = {}
    for it in items:
        seen = names.setdefault(it.label, it.classname)
        if seen != it.classname:
            raise DataError(f"{what}: label {it.label} is named both {seen!r} and {it.classname!r}")
    if not names:
        raise DataError(f"{what}: no items")
    n = max(names) + 1
    absent = [i for i in range(n) if i not in names]
    if absent or min(names) < 0:
        raise DataError(f"{what}: labels must be 0..{n - 1} with every label present; missing {absent[:5]}")
    return [names[i] for i in range(n)]
