"""`dgclip reproduce TABLE [--dry-run] [--launcher ...]`: a published table's grid through `dgclip sweep`."""
from __future__ import annotations

import sys

__all__ = ["add_parser", "run"]

# flags handed on to `dgclip sweep launch` unchanged when given (they override the paper preset)
_PASS = (("--root", 1), ("--launcher", 1), ("--submitit-cluster", 1), ("--submitit-options", 1), ("--steps", 1),
         ("--eval-every", 1), ("--backbone", 1), ("--pretrained", 1), ("--cache-dir", 1), ("--device", 1),
         ("--precision", 1), ("--workers", 1), ("--no-progress", 0), ("--hparams", 1), ("--epochs", 1))


def add_parser(subparsers):
    p = subparsers.add_parser("reproduce", help="run a published table's grid with the paper presets",
                              description="Launch TABLE's grid (methods x datasets x held-out domains x trial "
                                          "seeds) through `dgclip sweep launch --preset paper`; --dry-run prints "
                                          "the grid, the number of runs and the GPU hours where a measured "
                                          "per-step time exists. Then: dgclip results SWEEP_DIR --paper TABLE.")
    p.add_argument("table", help="dpl-table1, odgclip-open, gopro-base2new, gopro-cross-dataset, or 'list'")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the cost; run nothing")
    p.add_argument("--sweep-dir", default=None, help="default runs/reproduce/<table>")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the table's methods")
    p.add_argument("--datasets", nargs="+", default=None, help="a subset of the table's datasets")
    p.add_argument("--test-domains", nargs="+", default=None, help="leave-one-out tables: these held-out domains only")
    p.add_argument("--n-trials", type=int, default=None, help="trial seeds per cell (default: the table's)")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="--dry-run: seconds per training step you measured on a GPU (else: finished CUDA runs in "
                        "the sweep folder, then dgclip/reproduce/step_times.json)")
    for flag, nargs in _PASS:
        if nargs:
            p.add_argument(flag, default=None, help="passed on to `dgclip sweep launch`")
        else:
            p.add_argument(flag, action="store_true", help="passed on to `dgclip sweep launch`")
    return p


def run(args) -> int:
    from ..reproduce import TABLES, format_plan, get_table, launch, plan, step_seconds, sweep_argv

    if args.table == "list":
        for t in TABLES.values():
            print(f"  {t.id:20s} {t.title}")
        return 0
    table = get_table(args.table)
    if args.test_domains and all(g.protocol != "loo" for g in table.groups):
        raise ValueError(f"argument --test-domains: {table.id} runs a CoOp-suite protocol "
                         f"({', '.join(sorted({g.protocol for g in table.groups}))}), which has no held-out domains; "
                         "restrict it with --datasets / --methods")
    if args.n_trials is not None and args.n_trials < 1:
        raise ValueError(f"--n-trials must be >= 1, got {args.n_trials}")
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = int(args.steps)
    if args.backbone is not None:
        overrides["backbone"] = args.backbone
    root = args.root
    if root is None:
        from ..cli_flags import default_root as _default_root

        root = _default_root()
    rows = plan(table, root=root, methods=args.methods, datasets=args.datasets, n_trials=args.n_trials,
                test_domains=args.test_domains, overrides=overrides)
    sweep_dir = args.sweep_dir or f"runs/reproduce/{table.id}"
    print(format_plan(table, rows, step_s=args.step_seconds, times=step_seconds(sweep_dir)))
    passthrough = []
    for flag, nargs in _PASS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if nargs and value is not None:
            passthrough += [flag, str(value)]
        elif not nargs and value:
            passthrough.append(flag)
    argvs = [(g, a) for g in table.groups
             if (a := sweep_argv(table, g, sweep_dir=sweep_dir, methods=args.methods, datasets=args.datasets,
                                 n_trials=args.n_trials, test_domains=args.test_domains, passthrough=passthrough))]
    if args.dry_run:
        print("commands:")
        for _, a in argvs:
            print("  dgclip " + " ".join(_quote(x) for x in a))
        print(f"then: dgclip results {sweep_dir} --paper {table.id}")
        return 0
    rc = launch(table, argvs)
    print(f"[reproduce] results: dgclip results {sweep_dir} --paper {table.id}", file=sys.stderr)
    return rc


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
