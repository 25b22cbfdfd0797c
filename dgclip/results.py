"""`dgclip results DIR`: DomainBed-style tables from results.jsonl files.

Per (dataset, method, selection): one column per held-out domain and "Avg". A cell is the mean
+- DomainBed's error over seeds (population std / sqrt(n), collect_results.format_mean:
dgclip.selection.mean_and_error); "Avg" averages the domains within each seed first, then takes
mean +- error over the seeds that have every domain. Also writes CSV and a PNG bar chart.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .engine import read_records

__all__ = ["load_results", "summarise", "format_table", "write_csv", "plot", "METRIC_LABELS", "select_sweep",
           "SWEEP_SELECTIONS"]

# DomainBed's two model selections over a sweep (domainbed/model_selection.py).
SWEEP_SELECTIONS = {"training-domain": "training-domain validation (best hparam seed)",
                    "oracle": "oracle: test-domain validation, last step (best hparam seed)"}

METRIC_LABELS = {
    "test_acc": "accuracy (closed-set accuracy on the known classes for open-set data)",
    "h_score": "H-score, common rule: unknown when the known-class confidence is below the threshold "
               "accepting 95% of SOURCE-validation knowns (same rule for every method)",
    "h_score_native": "H-score, each method's own rule (argmax over C+1; '-' = closed-set method, no native unknown)",
    "h_score_swept_oracle": "H-score, best of 10 thresholds evenly spaced on the target (MEDIC): ORACLE",
    "auroc": "AUROC known vs unknown (known-class confidence, no threshold)",
    "oscr": "OSCR (no threshold)",
    "known_acc": "(C+1)-way accuracy on target knowns under the common rule",
    "known_acc_native": "(C+1)-way accuracy on target knowns under each method's own rule (ODG-CLIP/SeeCLIP 'Acc')",
    "unknown_recall_native": "unknown recall under each method's own rule",
    "unknown_recall": "unknown recall under the common rule",
}


def load_results(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    files = [path] if path.is_file() else sorted(path.rglob("results.jsonl"))
    if not files:
        raise FileNotFoundError(f"no results.jsonl under {path}")
    records = []
    for f in files:
        records += read_records(f)
    return records


def select_sweep(records: list[dict]) -> list[dict]:
    """DomainBed model selection over a sweep (dgclip.selection): one record per (dataset, method,
    test domain, trial seed) and selection, holding the test accuracy of the chosen hparam seed.

    training-domain: each run at its best source-validation step (ties: earliest), then the
      hparam seed with the highest such validation accuracy (ties: the LARGER seed).
    oracle: each run at its LAST step (no early stopping, as DomainBed), then the hparam seed
      with the highest test-domain out-split accuracy (ties: the larger seed); needs runs that
      tracked it (sweep jobs do).
    """
    from .selection import select_hparams_seed, select_in_run

    groups = defaultdict(dict)  # (dataset, method, test_domain, seed) -> hparams_seed -> record
    for r in records:
        if r.get("history"):
            groups[(r["dataset"], r["method"], r["test_domain"], r["seed"])][r["hparams_seed"]] = r
    out = []
    for (dataset, method, test_domain, seed), runs in sorted(groups.items()):
        base = {"dataset": dataset, "method": method, "test_domain": test_domain, "seed": seed,
                "n_hparams": len(runs)}
        sels = ["training-domain"]
        if all("oracle_acc" in r["history"][-1] for r in runs.values()):
            sels.append("oracle")
        for sel in sels:
            key = "oracle_acc" if sel == "oracle" else "val_acc"
            chosen = {h: select_in_run(r["history"], sel) for h, r in runs.items()}
            h = select_hparams_seed((h, c[key]) for h, c in chosen.items())
            entry = chosen[h]
            out.append({**base, "selection": SWEEP_SELECTIONS[sel], "hparams_seed": h, "test_acc": entry["test_acc"],
                        "val_acc": entry[key], "selected_step": entry["step"]})
    return out


def _mse(vals) -> tuple[float, float, int]:
    from .selection import mean_and_error

    return mean_and_error(vals)


def summarise(records: list[dict], metric: str = "test_acc") -> list[dict]:
    """Rows: dataset, method, selection, domains -> (mean, se, n), avg -> (mean, se, n)."""
    groups = defaultdict(list)
    for r in records:
        if metric in r:
            groups[(r["dataset"], r["method"], r["selection"])].append(r)
    rows = []
    for (dataset, method, selection), recs in sorted(groups.items()):
        by = defaultdict(dict)  # seed -> domain -> value (last record wins on duplicates)
        for r in recs:
            by[r["seed"]][r["test_domain"]] = r[metric]
        domains = sorted({d for s in by.values() for d in s})
        cells = {d: _mse([by[s][d] for s in by if d in by[s]]) for d in domains}
        full = [np.mean([by[s][d] for d in domains]) for s in by if all(d in by[s] for d in domains)]
        rows.append({"dataset": dataset, "method": method, "selection": selection, "metric": metric,
                     "domains": domains, "cells": cells, "avg": _mse(full),
                     "transductive": any(r.get("transductive") for r in recs)})
    return rows


def _fmt(cell, scale=100.0) -> str:
    m, se, n = cell
    if n == 0:
        return "-"
    return f"{m * scale:.1f} +- {se * scale:.1f}"


def format_table(rows: list[dict]) -> str:
    out = []
    for (dataset, selection, metric) in sorted({(r["dataset"], r["selection"], r["metric"]) for r in rows}):
        sub = [r for r in rows if (r["dataset"], r["selection"], r["metric"]) == (dataset, selection, metric)]
        domains = sorted({d for r in sub for d in r["domains"]})
        head = ["Method"] + domains + ["Avg"]
        body = [[r["method"] + (" *" if r.get("transductive") else "")]
                + [_fmt(r["cells"].get(d, (0, 0, 0))) for d in domains] + [_fmt(r["avg"])] for r in sub]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        nseeds = max(r["avg"][2] for r in sub)
        out.append(f"{dataset} | {metric} (%) | selection: {selection} | mean +- population std / sqrt(n) "
                   f"over seeds (DomainBed; up to {nseeds})")
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out += [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]
        if metric in METRIC_LABELS:
            out.append(f"{metric}: {METRIC_LABELS[metric]}")
        if any(r.get("transductive") for r in sub):
            out.append("* transductive: pools over seeded random test batches (its paper's eval batch size)")
        out.append("")
    return "\n".join(out)


def write_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "selection", "metric", "method", "domain", "mean", "se", "n_seeds"])
        for r in rows:
            for d in r["domains"] + ["Avg"]:
                m, se, n = r["avg"] if d == "Avg" else r["cells"][d]
                w.writerow([r["dataset"], r["selection"], r["metric"], r["method"], d, m, se, n])


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dataset"], r["selection"], r["metric"]) for r in rows})
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        sub = [r for r in rows if (r["dataset"], r["selection"], r["metric"]) == key]
        cols = sorted({d for r in sub for d in r["domains"]}) + ["Avg"]
        width = 0.8 / max(len(sub), 1)
        for i, r in enumerate(sub):
            vals = [(r["avg"] if c == "Avg" else r["cells"].get(c, (np.nan, 0, 0))) for c in cols]
            ax.bar(np.arange(len(cols)) + i * width, [100 * v[0] for v in vals], width,
                   yerr=[100 * v[1] for v in vals], label=r["method"], capsize=2)
        ax.set_xticks(np.arange(len(cols)) + width * (len(sub) - 1) / 2, cols)
        ax.set_ylabel(f"{key[2]} (%)")
        ax.set_title(f"{key[0]} — {key[1]}")
        ax.legend(fontsize=8, ncol=min(len(sub), 4))
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
