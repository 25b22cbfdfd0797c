"""Tables of CoOp-suite records, and ours beside a published table (`dgclip results DIR --paper`).

Aggregation over seeds as CoOp's `parse_test_res.py` (L60-61, L116-119): mean +- population std
(ddof 0). Rows selected with an oracle carry "(oracle)" in every table.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import SUITE_PROTOCOLS

__all__ = ["load_protocol_records", "aggregate", "format_protocol_tables", "load_published",
           "format_paper_comparison", "PUBLISHED_DIR", "PAPER_NAMES"]

PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "published"
PAPER_NAMES = {"zero-shot": "CLIP", "coop": "CoOp", "cocoop": "CoCoOp", "gopro": "GOPro"}
_BASE2NEW_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
_FULL_TARGETS = {"cross-dataset": _BASE2NEW_DATASETS[1:],
                 "imagenet-shift": ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")}
_TABLE_FOR = {"base2new": "gopro-base2new", "cross-dataset": "gopro-cross-dataset",
              "imagenet-shift": "gopro-imagenet-shift"}


def load_protocol_records(path) -> list[dict]:
    from ..results import load_results

    return [r for r in load_results(path) if r.get("protocol") in SUITE_PROTOCOLS]


def _is_oracle(rec: dict) -> bool:
    return str(rec.get("selection", "")).startswith("oracle")


def _metrics(rec: dict) -> dict:
    """column -> value (fraction) of one record, in the published tables' column names."""
    ds = rec["dataset"]
    if rec["protocol"] == "base2new":
        return {f"{ds}:base": rec["base_acc"], f"{ds}:new": rec["new_acc"], f"{ds}:hm": rec["hm"]}
    out = {ds: rec["test_acc"]}
    for t, v in (rec.get("target_acc") or {}).items():
        out[t] = v
    if rec.get("target_acc") and set(rec["target_acc"]) == set(_FULL_TARGETS[rec["protocol"]]):
        out["average"] = rec["target_avg"]  # comparable with a published average only over every target
    return out


def aggregate(records: list[dict]) -> dict:
    """(protocol, method, oracle?, shots) -> column -> (mean, std, n) over seeds (last record per
    seed wins)."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in records:
        key = (r["protocol"], r["method"], _is_oracle(r), r["shots"])
        for col, v in _metrics(r).items():
            groups[key][col][r["seed"]] = v
    out = {}
    for key, cols in groups.items():
        out[key] = {c: (float(np.mean(list(s.values()))), float(np.std(list(s.values()))), len(s))
                    for c, s in cols.items()}
    if any(k[0] == "base2new" for k in out):  # the 11-dataset average, where a method has all 11
        for key, cols in out.items():
            if key[0] != "base2new":
                continue
            datasets = sorted({c.split(":")[0] for c in cols})
            if set(datasets) >= set(_BASE2NEW_DATASETS):  # the published average is over all 11
                for m in ("base", "new"):
                    cols[f"average:{m}"] = (float(np.mean([cols[f"{d}:{m}"][0] for d in datasets])), float("nan"), 0)
                b, n = cols["average:base"][0], cols["average:new"][0]
                cols["average:hm"] = (2 * b * n / (b + n) if b + n else 0.0, float("nan"), 0)
    return out


def _cell(c) -> str:
    m, s, n = c
    return f"{100 * m:.2f}" if n <= 1 or np.isnan(s) else f"{100 * m:.2f}+-{100 * s:.2f}"


def _label(method: str, oracle: bool) -> str:
    return method + (" (oracle)" if oracle else "")


def format_protocol_tables(records: list[dict]) -> str:
    agg = aggregate(records)
    lines = []
    for protocol in SUITE_PROTOCOLS:
        keys = sorted(k for k in agg if k[0] == protocol)
        if not keys:
            continue
        seeds = {k: max(v[2] for v in agg[k].values()) for k in keys}
        if protocol == "base2new":
            lines.append("base-to-new (accuracy %, mean+-std over seeds; HM = 2*base*new/(base+new))")
            lines.append(f"{'dataset':16s} {'method':22s} {'shots':>5s} {'seeds':>5s} {'base':>13s} {'new':>13s} {'HM':>13s}")
            for k in keys:
                cols = agg[k]
                for ds in sorted({c.split(':')[0] for c in cols}, key=lambda d: (d == "average", d)):
                    lines.append(f"{ds:16s} {_label(k[1], k[2]):22s} {k[3]:5d} {seeds[k]:5d} "
                                 + " ".join(f"{_cell(cols[f'{ds}:{m}']):>13s}" for m in ("base", "new", "hm")))
        else:
            lines.append(f"{protocol} (accuracy %, mean+-std over seeds)")
            for k in keys:
                cols = agg[k]
                lines.append(f"  {_label(k[1], k[2])} shots={k[3]} seeds={seeds[k]}: "
                             + ", ".join(f"{c}={_cell(v)}" for c, v in cols.items()))
        lines.append("")
    if any(k[2] for k in agg):
        lines.append("(oracle) = epoch chosen by TEST accuracy (GOPro's released selection); not comparable "
                     "with the last-epoch rows")
    return "\n".join(lines).rstrip()


def load_published(table: str) -> dict:
    path = PUBLISHED_DIR / f"{table}.json"
    if not path.exists():
        known = sorted(p.stem for p in PUBLISHED_DIR.glob("*.json"))
        raise ValueError(f"no published table {table!r}; available: {', '.join(known)}")
    doc = json.loads(path.read_text())
    for key in ("table", "title", "source", "metric", "caveats", "columns", "rows"):
        if key not in doc:
            raise ValueError(f"published table {path} lacks {key!r}")
    return doc


def format_paper_comparison(records: list[dict], table: str = "auto") -> str:
    """Ours beside the published rows of the same method, column by column, with the difference
    (ours - paper, points) and every caveat of the rows shown."""
    agg = aggregate(records)
    tables = sorted({_TABLE_FOR[k[0]] for k in agg if k[0] in _TABLE_FOR}) if table == "auto" else [table]
    if not tables:
        return "no base2new / cross-dataset / imagenet-shift records to compare with a published table"
    out = []
    for t in tables:
        doc = load_published(t)
        out.append(f"{doc['title']}\nsource: {doc['source']}")
        out.append(f"{'method':22s} {'column':22s} {'ours':>13s} {'paper':>8s} {'diff':>7s}")
        shown, n_lines = set(), len(out)
        for key in sorted(agg):
            protocol, method, oracle, shots = key
            if _TABLE_FOR.get(protocol) != t:
                continue
            paper_row = PAPER_NAMES.get(method)
            published = doc["rows"].get(paper_row, {}) if paper_row else {}
            for col in doc["columns"]:
                if col not in agg[key]:
                    continue
                ours = 100 * agg[key][col][0]
                ref = published.get(col)
                diff = f"{ours - ref:+7.2f}" if ref is not None else "      -"
                out.append(f"{_label(method, oracle) + f' k={shots}':22s} {col:22s} {_cell(agg[key][col]):>13s} "
                           f"{(f'{ref:.2f}' if ref is not None else '-'):>8s} {diff}")
                if ref is not None:
                    shown.add(paper_row)
        if len(out) == n_lines:
            ours = sorted({c.split(":")[0] for k in agg if _TABLE_FOR.get(k[0]) == t for c in agg[k]})
            out.append(f"  (no published cell for {', '.join(ours)}: the table covers {', '.join(sorted({c.split(':')[0] for c in doc['columns']}))})")
        for row in sorted(shown):
            if row in doc["caveats"]:
                out.append(f"caveat ({row}, paper): {doc['caveats'][row]}")
        if any(k[2] for k in agg if _TABLE_FOR.get(k[0]) == t):
            out.append("caveat (ours): rows marked (oracle) chose their epoch by TEST accuracy")
        out.append("")
    return "\n".join(out).rstrip()
