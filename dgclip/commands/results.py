"""`dgclip results DIR`: the DomainBed table (+ CSV, and a PNG chart where matplotlib is installed)."""
from __future__ import annotations

from ..cli_flags import HelpFormatter
from ..protocols import cli as protocols_cli

# metrics every record has, and those open-set records add (dgclip.results.METRIC_LABELS)
KNOWN_METRICS = ("test_acc", "val_acc", "closed_acc", "h_score", "h_score_native", "h_score_swept_oracle", "auroc", "oscr",
                 "known_acc", "unknown_recall")


def add_parser(subparsers):
    p = subparsers.add_parser("results", help="DomainBed-style table (+ CSV, PNG) from results.jsonl",
                              formatter_class=HelpFormatter)
    p.add_argument("dir", help="a results.jsonl, a folder holding them, or a sweep folder")
    p.add_argument("--metric", default="test_acc", help="one of the numeric fields of the records: "
                   + ", ".join(KNOWN_METRICS) + " (open-set records have the last eight)")
    protocols_cli.add_results_arguments(p)  # --paper [TABLE]
    return p


def _metrics_in(records) -> list[str]:
    names = set()
    for r in records:
        names |= {k for k in KNOWN_METRICS if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)}
    return sorted(names)


def plot_or_say(rows, path) -> bool:
    """Write the chart; without matplotlib say how to get it (the table and CSV do not need it)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is None:
        print("no chart: matplotlib is not installed (pip install matplotlib, or the 'dgclip' extra: "
              "pip install -e '.[dgclip]'); the table and CSV above do not need it", file=sys.stderr)
        return False
    from ..results import plot

    plot(rows, path)
    return True


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..results import format_table, load_results, select_sweep, summarise, write_csv

    records = load_results(args.dir)
    loo = [r for r in records if not isinstance(r.get("protocol"), str)]  # CoOp-suite records: their own tables
    if getattr(args, "paper", None) is not None or (records and not loo):
        return protocols_cli.run_results(args)
    records = loo
    sweep = Path(args.dir).is_dir() and (Path(args.dir) / "sweep.json").exists()
    if sweep:  # DomainBed: the best hparam seed per (method, dataset, test domain, trial) and selection
        records = select_sweep(records)
        n_h = max((r["n_hparams"] for r in records), default=0)
        print(f"sweep {args.dir}: {len(records)} selections over up to {n_h} hparam seed(s) each; "
              "mean +- population std / sqrt(n) over trial seeds (DomainBed)")
    present = _metrics_in(records)
    if args.metric not in present:
        print(f"dgclip results: error: argument --metric: {args.metric!r} is not in these records; valid metrics "
              f"here: {', '.join(present) or '(none)'} (all: {', '.join(KNOWN_METRICS)})", file=sys.stderr)
        return 2
    rows = summarise(records, args.metric)
    print(format_table(rows))
    out = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
    csv_path, png_path = out / f"results_{args.metric}.csv", out / f"results_{args.metric}.png"
    write_csv(rows, csv_path)
    drew = plot_or_say(rows, png_path)
    print(f"wrote {csv_path}" + (f" and {png_path}" if drew else ""))
    return 0
