"""Open-set DG splits of one's own: a small JSON (or YAML, where PyYAML is installed) file of
class-NAME lists, passed as ``--dataset path/to/split.json``::

    {
      "dataset": "MyDG",                       # a registered name or a folder (relative to this file)
      "sources": ["cat", "dog", "horse"],      # known classes every source carries, or
                                               #   {"<domain>": [classes], ...} per source domain
      "target_known": ["cat", "dog"],          # known classes kept in the target's test set
      "target_unknown": ["zebra"],             # target-only classes (never seen in training)
      "name": "MyDG-open",                     # optional: the name in records and tables
      "note": "why these lists"                # optional: stated in every record
    }

Known classes = the union of the sources' classes, in the dataset's class order. Every name is
checked against the dataset's class folders before anything runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from .catalog import DatasetSpec, OpenSetSpec, UnknownDatasetError

__all__ = ["load_open_split", "SplitFileError"]

_FIELDS = {"dataset", "sources", "target_known", "target_unknown", "name", "note"}


class SplitFileError(UnknownDatasetError):
    """An open-set split file that cannot be used (named with the file and the field)."""


def _read(path: Path) -> dict:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise SplitFileError(f"{path}: YAML split files need PyYAML (pip install pyyaml); "
                                 "or write the same lists as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SplitFileError(f"{path}: not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SplitFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SplitFileError(f"{path}: expected an object with fields {sorted(_FIELDS)}")
    return data


def _names(path: Path, field: str, value, classes: tuple) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SplitFileError(f"{path}: {field!r} must be a non-empty list of class names")
    unknown = [v for v in value if v not in classes]
    if unknown:
        raise SplitFileError(f"{path}: {field!r} names class(es) {unknown} that the dataset does not have; "
                             f"its classes are {list(classes)}")
    if len(set(value)) != len(value):
        raise SplitFileError(f"{path}: {field!r} lists a class twice")
    return tuple(value)


def load_open_split(split_path) -> DatasetSpec:
    """The DatasetSpec of the split file's dataset with the file's open-set split."""
    from .catalog import get_spec

    path = Path(split_path).expanduser()
    if not path.is_file():
        raise SplitFileError(f"open-set split file {split_path} does not exist")
    data = _read(path)
    extra = set(data) - _FIELDS
    if extra:
        raise SplitFileError(f"{path}: unknown field(s) {sorted(extra)}; fields are {sorted(_FIELDS)}")
    for req in ("dataset", "sources", "target_known", "target_unknown"):
        if req not in data:
            raise SplitFileError(f"{path}: missing field {req!r}")
    ds = str(data["dataset"])
    local = (path.parent / ds)
    base = get_spec(str(local.resolve()) if local.is_dir() else ds)
    if base.open_set is not None:
        raise SplitFileError(f"{path}: 'dataset' {ds!r} already is an open-set variant; name the closed-set one")
    classes = base.classes
    sources = data["sources"]
    if isinstance(sources, dict):
        bad = [d for d in sources if d not in base.domains]
        if bad:
            raise SplitFileError(f"{path}: 'sources' names domain(s) {bad}; the domains are {list(base.domains)}")
        per_source = {d: _names(path, f"sources.{d}", v, classes) for d, v in sources.items()}
        union = {c for v in per_source.values() for c in v}
    else:
        per_source = None
        union = set(_names(path, "sources", sources, classes))
    known = tuple(c for c in classes if c in union)
    target_known = _names(path, "target_known", data["target_known"], classes)
    unknown = _names(path, "target_unknown", data["target_unknown"], classes)
    stray = [c for c in target_known if c not in union]
    if stray:
        raise SplitFileError(f"{path}: 'target_known' class(es) {stray} are in no source's list")
    both = [c for c in unknown if c in union]
    if both:
        raise SplitFileError(f"{path}: class(es) {both} are both a source class and 'target_unknown'")
    note = str(data.get("note", f"own split file {path.name}"))
    split = OpenSetSpec(known, unknown, per_source_known=per_source, note=note, target_known=target_known)
    name = str(data.get("name") or f"{base.name}-open-{path.stem}")
    return DatasetSpec(name, base.dirname, base.domains, classes, base.text_names, open_set=split,
                       embedded=base.embedded)
