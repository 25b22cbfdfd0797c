"""`dgclip train`: one method on one dataset, leave-one-domain-out (or the given test domains)."""
from __future__ import annotations

from ..presets.apply import add_preset_flag
from ..protocols import cli as protocols_cli
from ..cli_flags import METHODS, UNTRAINED_METHODS, HelpFormatter, add_flags, given, json_object

FLAGS = ("root", "output-dir", "seeds", "backbone", "pretrained", "cache-dir", "steps", "eval-every",
         "hparams-seed", "holdout-fraction", "selection", "train-domains", "device", "precision", "resume",
         "no-progress", "workers", "feature-cache-budget-gb", "skip-unreadable")


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train one method: leave-one-domain-out, or a CoOp-suite --protocol", formatter_class=HelpFormatter,
                              description="Train and evaluate one method; one record per held-out domain and "
                                          "seed in OUTPUT_DIR/results.jsonl. Every image the runs read is "
                                          "checked before the first step.")
    p.add_argument("--method", required=True, help="one of: " + ", ".join(METHODS))
    p.add_argument("--dataset", required=True, help="a registered name (see `dgclip --help`), a DomainBed-layout "
                                                    "folder, or an open-set split file (.json)")
    p.add_argument("--test-domain", default="all", help="a domain, 'a,b' (held out together) or 'all'")
    p.add_argument("--hparams", type=json_object, default=None,
                   help="JSON overrides of the method's hyper-parameters, e.g. '{\"lr\": 0.002}'")
    add_flags(p, FLAGS)
    add_preset_flag(p)
    protocols_cli.add_train_arguments(p)  # --protocol, --shots, --epochs, --targets (the CoOp suite)
    return p


def run(args) -> int:
    from ..methods import get_method
    from ._training import (check_images_first, ensure_pretrained, finish_args, finish_distributed, init_distributed,
                            train_configs)

    if args.method in UNTRAINED_METHODS:
        for flag in ("--steps", "--eval-every"):
            if given(args, flag):
                import sys

                print(f"dgclip train: error: argument {flag}: {args.method} has nothing to train (one evaluation)",
                      file=sys.stderr)
                return 2
    finish_args(args)
    get_method(args.method)
    from ..presets.apply import apply_to_train_args

    apply_to_train_args(args, args._argv)
    if protocols_cli.is_suite_run(args):  # the CoOp few-shot suite (dgclip.protocols)
        return protocols_cli.run_train(args, args.hparams or {})
    configs = list(train_configs(args, args.method, args.dataset, args.test_domain, args.hparams or {}))
    check_images_first([(c.dataset, c.test_domains, c.train_domains) for c in configs], args.root, args.cache_dir,
                       args.skip_unreadable)
    started, ok = init_distributed(), False
    try:
        ensure_pretrained(args)
        for cfg in configs:
            rec = run_training_verbose(cfg)
            print(f"{rec['method']:>10s} {rec['dataset']} test={rec['test_domain']} seed={rec['seed']} "
                  f"test_acc={rec['test_acc']:.4f} (val {rec['val_acc']:.4f}, step {rec['selected_step']})",
                  flush=True)
        ok = True
    finally:
        finish_distributed(started, ok)
    return 0


def run_training_verbose(cfg):
    """run_training, saying which images were left out under --skip-unreadable."""
    import sys

    from ..engine import run_training

    rec = run_training(cfg)
    skipped = (rec.get("data") or {}).get("unreadable_skipped") or []
    if skipped:
        print(f"[dgclip] left out {len(skipped)} unreadable image(s) (--skip-unreadable; listed in the record "
              f"under data.unreadable_skipped): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
              file=sys.stderr)
    return rec
