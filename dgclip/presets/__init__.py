"""Presets: the settings each paper (or its released code) used, per (method, dataset).

`--preset paper` resolves a (method, dataset) pair to the values of that method's paper or
released configuration, each a `Sourced` saying where it comes from; `--preset embedded` is the
project's toy default (the tiny CLIP on rotated digits, the CLI's defaults). Explicit flags win
over a preset, and a run's record stores the resolved values with their sources.

Each module named in `_MODULES` exports ``PRESETS: dict[(method, dataset), dict[str, Sourced]]``.
Keys are run settings (`RUN_KEYS`: steps, epochs, eval_every, backbone, pretrained,
holdout_fraction) or the method's own hyper-parameters (lr, batch_size, momentum, ...).
"""
from __future__ import annotations

import importlib
from typing import Optional

from ..provenance import Sourced

__all__ = ["PRESET_NAMES", "RUN_KEYS", "resolve", "available", "all_presets", "UnknownPresetError"]

PRESET_NAMES = ("paper", "embedded")
# run settings (CLI flags / TrainConfig fields); every other key is a method hyper-parameter.
# `epochs` is turned into `steps` from the dataset's size when a run is set up (presets.apply).
RUN_KEYS = ("steps", "epochs", "eval_every", "backbone", "pretrained", "holdout_fraction")

# coop_suite is written alongside the few-shot protocol; until that module exists it is skipped
# (only a missing module is skipped: an error inside an existing one surfaces).
_MODULES = ("domainbed", "coop_suite")

EMBEDDED = {
    "steps": Sourced(300, "project: the CLI's default; minutes on a 2-core CPU with the tiny CLIP"),
    "eval_every": Sourced(50, "project: the CLI's default evaluation interval"),
    "backbone": Sourced("tiny-digits", "project: embedded tiny CLIP, pretrained offline on captioned digits"),
    "pretrained": Sourced("default", "project: weights written by `dgclip pretrain`"),
    "holdout_fraction": Sourced(0.2, "released: facebookresearch/DomainBed/domainbed/scripts/train.py:L46"),
}


class UnknownPresetError(ValueError):
    pass


_CACHE: Optional[dict] = None


def all_presets() -> dict:
    """{(method, dataset): {name: Sourced}} from every module in `_MODULES` that exists."""
    global _CACHE
    if _CACHE is None:
        table = {}
        for name in _MODULES:
            full = f"{__name__}.{name}"
            try:
                mod = importlib.import_module(full)
            except ModuleNotFoundError as exc:
                if exc.name == full:
                    continue
                raise
            for key, values in mod.PRESETS.items():
                if key in table:
                    raise ValueError(f"preset {key} is defined twice (second time in {full})")
                table[key] = dict(values)
        _CACHE = table
    return _CACHE


def available(method: Optional[str] = None) -> list:
    return sorted(k for k in all_presets() if method is None or k[0] == method)


def resolve(preset_name: str, method: str, dataset: str) -> dict:
    """{name: Sourced} of `preset_name` for (method, dataset); raises UnknownPresetError."""
    if preset_name == "embedded":
        return dict(EMBEDDED)
    if preset_name != "paper":
        raise UnknownPresetError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESET_NAMES)}")
    key = (method, dataset.lower())
    table = all_presets()
    if key not in table:
        same = [d for m, d in available(method)]
        raise UnknownPresetError(
            f"no paper preset for method {method!r} on dataset {dataset!r}"
            + (f"; {method} has paper presets for: {', '.join(same)}" if same else
               f"; methods with paper presets: {', '.join(sorted({m for m, _ in table}))}")
            + ". Use --preset embedded, or pass every setting as a flag")
    return dict(table[key])
