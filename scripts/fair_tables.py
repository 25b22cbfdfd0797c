#!/usr/bin/env python
"""The README's results tables, from one DomainBed-style random search run the same way for every
method, with selection on SOURCE data only.

Per method, dataset, held-out domain and trial seed: hparams seeds 0..H-1 (seed 0 = the method's
defaults, seeds >= 1 = draws from its search space: lr log-uniform over [default/10, default*10]
and the method's own names, `Method.search_space`), every run `--steps` steps, evaluated every
`--eval-every`. Two tables per dataset:
  search    DomainBed training-domain validation: each run at its best source-validation step
            (earliest on a tie), then the hparams seed with the best source validation (larger
            seed on a tie); mean +- DomainBed's error (population std / sqrt(n)) over trial seeds.
  defaults  hparams seed 0 only (each method's defaults), same within-run selection.
No number of a target domain enters any choice; the oracle column is not computed.

Usage (what produced benchmarks/results/fair_tables.md):
  OMP_NUM_THREADS=1 nice python scripts/fair_tables.py --out runs/fair --n-hparams 3 --n-trials 2
Re-running with the same --out resumes (finished jobs are skipped) and rewrites the tables.
`--methods M ...` launches only those methods' jobs; the tables are still built from every method's
finished runs. A job key names the hparams seed, not the values a seed resolves to, so a changed
default keeps the key: a finished run whose recorded hyper-parameters differ from what its seed
resolves to now is stale. Stale runs of launched methods are deleted and rerun; a stale run of a
method not launched stops the table build (never mixed into a table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLOSED = ["zero-shot", "coop", "cocoop", "dpl", "dalsclip", "gopro"]
OPEN = ["zero-shot", "coop", "seeclip"]


def _jobs(args, dataset, methods):
    from dgclip.sweep import make_grid

    trials = args.open_trials if dataset.endswith("-open") and args.open_trials else args.n_trials
    train = {"root": args.root, "cache_dir": args.cache_dir, "eval_every": args.eval_every, "progress": False,
             "workers": 0}
    return make_grid(Path(args.out) / dataset, methods, [dataset], ["all"], args.n_hparams, trials,
                     steps=args.steps, **train)


def _stale_reason(job, record) -> str:
    """'' when the finished run used the hyper-parameters its seed resolves to now, else the diff."""
    from dgclip.data.catalog import get_spec
    from dgclip.methods import get_method

    def norm(d):  # as the JSON record stores it
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    now = {**get_method(job.method).hparams_for(job.hparams_seed, embedded=get_spec(job.dataset).embedded),
           **job.train.get("hparams", {})}
    old, now = norm(record.get("hparams", {})), norm(now)
    return "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
                     for k in sorted(old.keys() | now.keys()) if old.get(k) != now.get(k))


_NOT_RESULTS = ("output_dir", "progress", "workers", "resume", "preset", "track_oracle")


def _same_settings(job, record) -> bool:
    """The record's config equals the job's on every result field; a field the record lacks (added
    to TrainConfig after the run) must be at its default, i.e. the behaviour the run had."""
    from dataclasses import asdict, fields

    from dgclip.engine import TrainConfig

    def norm(d):
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    now = norm(asdict(TrainConfig(**job.config())))
    defaults = norm({f.name: f.default for f in fields(TrainConfig) if isinstance(f.default, (bool, int, float, str, type(None)))})
    old = norm(record.get("config") or {})
    return all((old[k] if k in old else defaults.get(k, object())) == v for k, v in now.items() if k not in _NOT_RESULTS)


def _run_folder(job):
    """The job's folder; or, when the key's hash changed only because TrainConfig gained a field
    since the run (a run made before that field behaves as its default), the one finished folder
    of the same readable name whose recorded config equals the job's on every result field."""
    from dgclip.engine import read_records

    if (job.folder / "done").exists():
        return job.folder
    name = job.key.rsplit("__", 1)[0]
    matches = [f for f in Path(job.sweep_dir).glob(f"{name}__*") if (f / "done").exists()
               and any(_same_settings(job, r) for r in read_records(f / "results.jsonl"))]
    if len(matches) > 1:
        raise SystemExit(f"several finished runs match {job.key}: {[str(m) for m in matches]}")
    return matches[0] if matches else None


def _finished_records(job) -> list:
    from dgclip.engine import read_records

    folder = _run_folder(job)
    return read_records(folder / "results.jsonl") if folder else []


def _delete_stale(jobs) -> int:
    """Delete finished runs made with other hyper-parameters than their seed resolves to now."""
    import shutil

    n = 0
    for j in jobs:
        folder = _run_folder(j)
        if folder is not None and any(_stale_reason(j, r) for r in _finished_records(j)):
            print(f"stale run deleted (rerun): {folder.name}: {_stale_reason(j, _finished_records(j)[-1])}")
            shutil.rmtree(folder)
            n += 1
    return n


def _cell(mean, err, n) -> str:
    if n == 0:
        return "-"  # e.g. a closed-set method has no native unknown rule
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {err:.1f}"  # one trial seed: no error bar


def _table(records, metric, defaults_only):
    from dgclip.selection import mean_and_error, select_hparams_seed, select_in_run

    runs = defaultdict(dict)  # (method, domain, trial) -> hparams seed -> record
    for r in records:
        if defaults_only and r["hparams_seed"] != 0:
            continue
        runs[(r["method"], r["test_domain"], r["seed"])][r["hparams_seed"]] = r
    picked = defaultdict(lambda: defaultdict(dict))  # method -> domain -> trial -> value
    for (method, dom, trial), by_h in runs.items():
        chosen = {h: select_in_run(r["history"], "training-domain") for h, r in by_h.items()}
        h = select_hparams_seed((h, c["val_acc"]) for h, c in chosen.items())
        entry = chosen[h]
        value = entry["test_acc"] if metric == "test_acc" else entry.get("open_set", {}).get(metric, float("nan"))
        picked[method][dom][trial] = value
    domains = sorted({d for m in picked.values() for d in m}, key=lambda d: (len(d), d))
    lines = ["| method | " + " | ".join(domains) + " | Avg |", "|---" * (len(domains) + 2) + "|"]
    order = [m for m in CLOSED + OPEN if m in picked] + sorted(m for m in picked if m not in CLOSED + OPEN)
    for method in dict.fromkeys(order):
        cells = []
        for d in domains:
            m, e, n = mean_and_error([100 * v for v in picked[method].get(d, {}).values()])
            cells.append(_cell(m, e, n))
        trials = set.intersection(*[set(picked[method].get(d, {})) for d in domains])
        avg = [sum(100 * picked[method][d][t] for d in domains) / len(domains) for t in sorted(trials)]
        m, e, n = mean_and_error(avg)
        avg_cell = _cell(m, e, n)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg_cell} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/fair")
    ap.add_argument("--root", default=os.environ.get("DGCLIP_DATA", str(REPO / "data")))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--n-hparams", type=int, default=3, help="hparams seeds per cell: 0 = defaults, then draws")
    ap.add_argument("--n-trials", type=int, default=2, help="trial seeds (data splits) per cell")
    ap.add_argument("--open-trials", type=int, default=None, help="trial seeds for the open-set table (default: --n-trials)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--closed", nargs="*", default=CLOSED)
    ap.add_argument("--open", nargs="*", default=OPEN)
    ap.add_argument("--methods", nargs="+", default=None,
                    help="launch only these methods' jobs (default: all); the tables include every method")
    ap.add_argument("--tables-only", action="store_true", help="rebuild the tables from finished jobs")
    ap.add_argument("--note", action="append", default=[], help="a line to add under the header (e.g. how long the runs took)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "fair_tables.md"))
    args = ap.parse_args(argv)

    from dgclip.sweep import launch

    t0 = time.time()
    plan = [("rotated-digits", args.closed), ("rotated-digits-open", args.open)]
    plan = [(d, m) for d, m in plan if m]
    if not args.tables_only:
        from dgclip.pretrain import pretrain_tiny_clip

        pretrain_tiny_clip(Path(args.cache_dir) if args.cache_dir else None, progress=False)
        for dataset, methods in plan:
            chosen = [m for m in methods if args.methods is None or m in args.methods]
            if chosen:
                jobs = _jobs(args, dataset, chosen)
                _delete_stale(jobs)
                launch(jobs, "local")
    elapsed = time.time() - t0
    out = [f"# Fair tables: one random search per method, source-validation selection",
           "",
           f"Command: `OMP_NUM_THREADS=1 nice python scripts/fair_tables.py --n-hparams {args.n_hparams} "
           f"--n-trials {args.n_trials}" + (f" --open-trials {args.open_trials}" if args.open_trials else "")
           + f" --steps {args.steps} --eval-every {args.eval_every}`",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared, loaded); "
           + (f"tables rebuilt from the finished runs" if args.tables_only else f"wall time of the launch: {elapsed / 60:.1f} min"),
           f"Every method: hparams seeds 0..{args.n_hparams - 1} (0 = its defaults) x trial seeds "
           f"0..{args.n_trials - 1} (open set: {args.open_trials or args.n_trials} trial seed(s)) x every held-out "
           f"domain, {args.steps} steps. Cells: mean ± population std / "
           f"sqrt(n) over trial seeds (DomainBed). Selection never sees a target number.",
           *args.note, ""]
    for dataset, methods in plan:
        jobs = _jobs(args, dataset, methods)
        records, n_done = [], 0
        for j in jobs:
            recs = _finished_records(j)
            n_done += bool(recs)
            if recs:
                stale = [_stale_reason(j, r) for r in recs if _stale_reason(j, r)]
                if stale:
                    raise SystemExit(f"stale run {j.folder}: made with other hyper-parameters than hparams seed "
                                     f"{j.hparams_seed} resolves to now ({stale[0]}); rerun with --methods {j.method}")
                records += recs
        notes = {r["method"]: r.get("method_notes", {}).get("unknown_generator_note") for r in records
                 if r.get("method_notes", {}).get("unknown_generator_note")}
        metrics = ["test_acc"] + (["h_score_native", "known_acc_native", "h_score", "auroc", "oscr"]
                                  if dataset.endswith("-open") else [])
        out.append(f"## {dataset} ({n_done}/{len(jobs)} runs finished)")
        for note_method, note in notes.items():
            out.append(f"- {note_method}: pseudo-unknown generator = {note}")
        for metric in metrics:
            for defaults_only, title in ((False, f"search ({args.n_hparams} hparams seeds, training-domain validation)"),
                                         (True, "defaults (hparams seed 0)")):
                out += ["", f"### {metric}: {title}", "", _table(records, metric, defaults_only)]
        out.append("")
    text = "\n".join(out) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
