"""Model selection and error bars, DomainBed's rules to the digit (one module for the CLI, the
sweep, the results tables and the engine).

facebookresearch/DomainBed (commit b93c22a):
- training-domain validation (`IIDAccuracySelectionMethod`, domainbed/model_selection.py:L75-100):
  within a run, the checkpoint with the highest mean source out-split accuracy; Python's `max`
  keeps the FIRST maximal record in file order, i.e. the earliest step on a tie
  (domainbed/lib/query.py:L142-144).
- oracle (`OracleSelectionMethod`, L54-73): within a run the LAST checkpoint, scored by the
  target's out-split accuracy; no early stopping on the target.
- across hyper-parameter seeds (`hparams_accs` + `sweep_acc`, L27-52; query.py:L80-94, L173-182):
  runs grouped by sorted hparams_seed, stable ascending sort on the validation accuracy (NaN as
  -inf), then reversed: on a tie the LARGER hparams seed wins.
- error bars (domainbed/scripts/collect_results.py `format_mean`, L64-74): mean over trial seeds
  +- np.std(accs / sqrt(n)), the POPULATION std (ddof 0) divided by sqrt(n).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["SELECTIONS", "best_step", "last_step", "select_in_run", "select_hparams_seed", "mean_and_error",
           "validation_key"]

SELECTIONS = ("training-domain", "oracle")


def validation_key(selection: str) -> str:
    """The history field a selection scores a checkpoint by."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return "oracle_acc" if selection == "oracle" else "val_acc"


def _value(x) -> float:
    x = float(x)
    return -math.inf if math.isnan(x) else x


def best_step(history: Sequence[Mapping], key: str = "val_acc") -> Mapping:
    """The checkpoint with the highest `key`; on a tie the earliest (DomainBed's `max`)."""
    if not history:
        raise ValueError("no evaluations to select from")
    best = 0
    for i in range(1, len(history)):
        if _value(history[i][key]) > _value(history[best][key]):
            best = i
    return history[best]


def last_step(history: Sequence[Mapping]) -> Mapping:
    """The checkpoint with the largest step (DomainBed's oracle: no early stopping)."""
    if not history:
        raise ValueError("no evaluations to select from")
    return max(history, key=lambda h: h["step"])


def select_in_run(history: Sequence[Mapping], selection: str) -> Mapping:
    """training-domain: best source-validation step (earliest on a tie); oracle: the last step."""
    validation_key(selection)
    return last_step(history) if selection == "oracle" else best_step(history, "val_acc")


def select_hparams_seed(candidates: Iterable[tuple[int, float]]) -> int:
    """The hparams seed with the highest validation accuracy; on a tie the LARGER seed
    (DomainBed's stable ascending sort of seed-sorted groups, then reversed). NaN counts as -inf."""
    cands = list(candidates)
    if not cands:
        raise ValueError("no hyper-parameter seeds to select from")
    return max(cands, key=lambda c: (_value(c[1]), c[0]))[0]


def mean_and_error(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, DomainBed's error bar, n): error = population std of values / sqrt(n), i.e.
    np.std(values / sqrt(n)) as collect_results.format_mean; NaNs are dropped, n = 0 gives NaNs."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(np.std(v / math.sqrt(v.size))), int(v.size)
