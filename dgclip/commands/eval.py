"""`dgclip eval --checkpoint C [--dataset D [--test-domain X]]`: the evaluation stored in a
checkpoint, or the checkpoint scored on any dataset with its training classes (dgclip.evaluate)."""
from __future__ import annotations

from ..cli_flags import HelpFormatter, add_flags


# flags that only mean something when scoring a dataset -> their defaults
DATASET_ONLY = {"test_domain": None, "root": None, "cache_dir": None, "device": "auto", "precision": "auto",
                "workers": None, "skip_unreadable": False, "output_dir": "runs/dgclip-eval"}


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="a checkpoint's stored evaluation, or the checkpoint scored on a dataset",
                              formatter_class=HelpFormatter,
                              description="Without --dataset: print the selected evaluation stored in the "
                                          "checkpoint. With --dataset: score the checkpoint's model on every "
                                          "image of each chosen domain (classes matched by name to the training "
                                          "classes) and append one record per domain to OUTPUT_DIR/results.jsonl.")
    p.add_argument("--checkpoint", required=True, help="a .pt file from OUTPUT_DIR/checkpoints/")
    p.add_argument("--dataset", default=None, help="a registered name or a DomainBed-layout folder")
    p.add_argument("--test-domain", default=None, help="a domain, 'a,b' (scored together) or 'all' (each in turn; "
                                                       "the default with --dataset)")
    add_flags(p, ("root", "cache-dir", "device", "precision", "workers", "skip-unreadable"))
    add_flags(p, ("output-dir",), output_dir=DATASET_ONLY["output_dir"])
    return p


def run(args) -> int:
    import sys

    if args.dataset is None:  # printing the stored evaluation reads nothing else: refuse what would be ignored
        for dest, default in DATASET_ONLY.items():
            if getattr(args, dest) != default:
                print(f"dgclip eval: error: argument --{dest.replace('_', '-')}: only applies with --dataset",
                      file=sys.stderr)
                return 2
        return _stored(args.checkpoint)
    from ._training import finish_args
    from ..evaluate import evaluate_checkpoint

    finish_args(args)
    recs = evaluate_checkpoint(args.checkpoint, args.dataset, root=args.root, test_domain=args.test_domain or "all",
                               output_dir=args.output_dir, device=args.device, cache_dir=args.cache_dir,
                               workers=args.workers, skip_unreadable=args.skip_unreadable, precision=args.precision)
    for r in recs:
        print(f"{r['method']:>10s} {r['dataset']} domain={r['test_domain']} test_acc={r['test_acc']:.4f} "
              f"({r['n_test']} images; weights of step {r['selected_step']})")
    print(f"recorded in {args.output_dir}/results.jsonl; table: dgclip results {args.output_dir}")
    return 0


def _stored(checkpoint: str) -> int:
    import json

    import torch

    from ..selection import select_in_run

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["config"]
    chosen = select_in_run(state["history"], cfg.get("selection", "training-domain"))
    print(json.dumps({"method": cfg["method"], "dataset": cfg["dataset"], "test_domain": "+".join(cfg["test_domains"]),
                      "seed": cfg["seed"], "step_in_checkpoint": state["step"], "selected_step": chosen["step"],
                      "test_acc": chosen["test_acc"], "val_acc": chosen["val_acc"],
                      "test": chosen["test"]}, indent=2))
    return 0
