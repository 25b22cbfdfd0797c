"""`dgclip quickstart`: the embedded default end to end (pretrain, 4 baselines, the leave-one-domain-out
table, then the base-to-new table of the CoOp-suite protocol)."""
from __future__ import annotations

from ..cli_flags import HelpFormatter, add_flags, reject

# quickstart: 200 steps per run (eval every 50) so 4 methods x 6 held-out domains stay within
# minutes on a 2-core CPU, each method with its defaults (methods carry their embedded-default
# settings themselves: `Method.embedded_hparams`, documented in the README).
QUICKSTART = {
    "methods": ["zero-shot", "coop", "cocoop", "dpl"],
    "dataset": "rotated-digits",
    "backbone": "tiny-digits",
    "pretrained": "default",
    "steps": 200,
    "eval_every": 50,
    # every method with its own defaults (on the embedded default: its `embedded_hparams`)
    "hparams": {},
}
FLAGS = ("root", "output-dir", "seeds", "cache-dir", "steps", "hparams-seed", "holdout-fraction", "selection",
         "device", "precision", "resume", "no-progress", "workers", "feature-cache-budget-gb", "skip-unreadable")


def add_parser(subparsers):
    p = subparsers.add_parser("quickstart", help="embedded default end to end: pretrain, 4 baselines leave-one-domain-out, then base-to-new",
                              formatter_class=HelpFormatter,
                              description=f"Methods {', '.join(QUICKSTART['methods'])} on {QUICKSTART['dataset']} "
                                          f"with the embedded {QUICKSTART['backbone']} CLIP, every domain held out "
                                          "in turn.")
    # three seeds by default: the table's mean +- standard error is then meaningful (~1-2 min on 2 cores)
    add_flags(p, FLAGS, output_dir="runs/quickstart", seeds=[0, 1, 2], steps=QUICKSTART["steps"])
    for flag in ("--backbone", "--pretrained"):
        reject(p, flag, "quickstart always uses the embedded tiny-digits CLIP; use `dgclip train` for another backbone")
    reject(p, "--eval-every", f"quickstart evaluates every {QUICKSTART['eval_every']} steps; use `dgclip train`")
    reject(p, "--train-domains", "quickstart holds out each domain in turn; use `dgclip train`")
    return p


def run(args) -> int:
    import time
    from pathlib import Path

    from ..results import format_table, load_results, summarise, write_csv
    from ._training import ensure_pretrained, finish_args, train_configs
    from .results import plot_or_say
    from .train import run_training_verbose

    t0 = time.time()
    finish_args(args)
    args.backbone, args.pretrained = QUICKSTART["backbone"], QUICKSTART["pretrained"]
    args.eval_every, args.train_domains = QUICKSTART["eval_every"], None
    ensure_pretrained(args)
    for method in QUICKSTART["methods"]:
        hp = QUICKSTART["hparams"].get(method, {})
        for cfg in train_configs(args, method, QUICKSTART["dataset"], "all", hp):
            rec = run_training_verbose(cfg)
            print(f"{method:>10s} held-out {rec['test_domain']:6s} seed {rec['seed']}: "
                  f"test acc {100 * rec['test_acc']:.1f}%", flush=True)
    rows = summarise(load_results(Path(args.output_dir) / "results.jsonl"))
    print()
    print(format_table(rows))
    write_csv(rows, Path(args.output_dir) / "results_test_acc.csv")
    plot_or_say(rows, Path(args.output_dir) / "results_test_acc.png")
    print()
    from ..protocols import cli as protocols_cli

    protocols_cli.quickstart_base2new(args)  # the CoOp-suite protocol offline: digits 0-4 base, 5-9 new
    print(f"quickstart finished in {time.time() - t0:.0f} s; results in {args.output_dir}")
    return 0
