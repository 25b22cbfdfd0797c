"""Values that carry where they come from.

Every hyper-parameter default, preset value and protocol constant in dgclip can say where it comes
from: a paper's section or equation, a released file and line, or the project's own reason. A
`Sourced` is that pair; a table of them prints as the `describe` output and enters run records.

Source strings follow three forms, so a reader can tell them apart at a glance:
  "paper: <venue/arXiv> §<section> / Eq. <n>"
  "released: <repository>/<path>:L<line>"
  "project: <why>"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

SOURCE_KINDS = ("paper", "released", "project")


@dataclass(frozen=True)
class Sourced:
    value: Any
    source: str

    def __post_init__(self):
        kind = self.source.split(":", 1)[0].strip()
        if kind not in SOURCE_KINDS:
            raise ValueError(f"source {self.source!r} must start with one of {', '.join(k + ':' for k in SOURCE_KINDS)}")


def values(table: Mapping[str, Sourced]) -> dict:
    """The plain values of a table of sourced values."""
    return {name: entry.value for name, entry in table.items()}


def sources(table: Mapping[str, Sourced]) -> dict:
    """name -> source string, as stored in a run record."""
    return {name: entry.source for name, entry in table.items()}


def format_table(table: Mapping[str, Sourced]) -> str:
    """Aligned `name  value  source` lines, one per entry, sorted by name."""
    if not table:
        return ""
    rows = [(name, repr(entry.value), entry.source) for name, entry in sorted(table.items())]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
