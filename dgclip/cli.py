"""`dgclip` command line: pretrain, train, eval, results, datasets, quickstart, sweep."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .protocols import cli as protocols_cli

__all__ = ["main", "QUICKSTART"]

# quickstart: 200 steps per run (eval every 50) so 4 methods x 6 held-out domains stay within
# minutes on a 2-core CPU, each method with its defaults (methods carry their embedded-default
# settings themselves: `Method.embedded_hparams`, documented in the README).
QUICKSTART = {
    "methods": ["zero-shot", "coop", "cocoop", "dpl"],
    "dataset": "rotated-digits",
    "steps": 200,
    "eval_every": 50,
    # every method with its own defaults (on the embedded default: its `embedded_hparams`)
    "hparams": {},
}


def _default_root() -> str:
    from .backbone import default_cache_dir

    return os.environ.get("DGCLIP_DATA", str(default_cache_dir() / "data"))


def _init_distributed():
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def _finish_distributed(started: bool, ok: bool) -> None:
    """Tear down a process group this command started. After a successful run, first wait for every
    rank (a rank that exits while its peer still talks to gloo aborts the peer); after an error,
    never wait (the peers may be stuck elsewhere: torchrun stops them)."""
    import torch.distributed as dist

    if started and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def _train_configs(args, method, dataset, test_domain, hparams):
    from .data.catalog import get_spec
    from .data.splits import resolve_test_domains
    from .engine import TrainConfig

    spec = get_spec(dataset)
    for doms in resolve_test_domains(spec, test_domain):
        for seed in args.seeds:
            yield TrainConfig(method=method, dataset=dataset, root=args.root, test_domains=doms, seed=seed,
                              output_dir=args.output_dir, backbone=args.backbone, pretrained=args.pretrained,
                              cache_dir=args.cache_dir, steps=args.steps, eval_every=args.eval_every,
                              hparams_seed=args.hparams_seed, hparams=hparams,
                              holdout_fraction=args.holdout_fraction, selection=args.selection,
                              train_domains=args.train_domains, device=args.device,
                              precision=args.precision, progress=not args.no_progress, resume=args.resume,
                              workers=args.workers, feature_cache_budget_gb=args.feature_cache_budget_gb)


def _ensure_pretrained(args):
    from .pretrain import pretrain_tiny_clip
    from .tiny_clip import EMBEDDED_MODELS, weights_path

    if args.backbone in EMBEDDED_MODELS and args.pretrained in ("default", "dgclip-pretrain"):
        path = weights_path(args.backbone, Path(args.cache_dir) if args.cache_dir else None)
        if not path.exists():
            print(f"[dgclip] no cached {args.backbone} weights: pretraining once -> {path}", file=sys.stderr)
            pretrain_tiny_clip(Path(args.cache_dir) if args.cache_dir else None, progress=not args.no_progress)


def cmd_train(args) -> int:
    from .engine import run_training
    from .methods import get_method

    get_method(args.method)
    hparams = json.loads(args.hparams) if args.hparams else {}
    if protocols_cli.is_suite_run(args):  # the CoOp few-shot suite (dgclip.protocols)
        return protocols_cli.run_train(args, hparams)
    started, ok = _init_distributed(), False
    try:
        _ensure_pretrained(args)
        for cfg in _train_configs(args, args.method, args.dataset, args.test_domain, hparams):
            rec = run_training(cfg)
            print(f"{rec['method']:>10s} {rec['dataset']} test={rec['test_domain']} seed={rec['seed']} "
                  f"test_acc={rec['test_acc']:.4f} (val {rec['val_acc']:.4f}, step {rec['selected_step']})",
                  flush=True)
        ok = True
    finally:
        _finish_distributed(started, ok)
    return 0


def cmd_results(args) -> int:
    from .results import format_table, plot, select_sweep, summarise, write_csv

    if getattr(args, "paper", None) is not None or not any(True for _ in _loo_records(args.dir)):
        return protocols_cli.run_results(args)
    records = list(_loo_records(args.dir))  # CoOp-suite records have their own tables (--paper)
    sweep = Path(args.dir).is_dir() and (Path(args.dir) / "sweep.json").exists()
    if sweep:  # DomainBed: the best hparam seed per (method, dataset, test domain, trial) and selection
        records = select_sweep(records)
        n_h = max((r["n_hparams"] for r in records), default=0)
        print(f"sweep {args.dir}: {len(records)} selections over up to {n_h} hparam seed(s) each; "
              "mean +- s.e. over trial seeds")
    rows = summarise(records, args.metric)
    if not rows:
        print(f"no records with metric {args.metric!r} in {args.dir}", file=sys.stderr)
        return 1
    print(format_table(rows))
    out = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
    write_csv(rows, out / f"results_{args.metric}.csv")
    plot(rows, out / f"results_{args.metric}.png")
    print(f"wrote {out / f'results_{args.metric}.csv'} and {out / f'results_{args.metric}.png'}")
    return 0


def _loo_records(path):
    from .results import load_results

    return (r for r in load_results(path) if not isinstance(r.get("protocol"), str))


def cmd_datasets(args) -> int:
    from .data.catalog import get_spec, list_datasets
    from .data.domainbed import DataError, verify

    if not Path(args.root).is_dir():
        raise DataError(f"data root {args.root} does not exist")
    seen, found = set(), 0
    for key in list_datasets():
        spec = get_spec(key)
        if spec.dirname in seen:
            continue
        seen.add(spec.dirname)
        rep = verify(args.root, spec, check_images=not args.quick)
        if not rep["found"]:
            print(f"  {spec.name:16s} not found ({rep['path']})")
            continue
        found += 1
        status = "OK" if not rep["problems"] else f"{len(rep['problems'])} problem(s)"
        counts = ", ".join(f"{d}: {n}" for d, n in rep["domains"].items())
        print(f"  {spec.name:16s} {status}: {counts}")
        for p in rep["problems"]:
            print(f"      - {p}")
    print(f"{found} dataset(s) found under {args.root}")
    return protocols_cli.print_suite_datasets(args)


def cmd_pretrain(args) -> int:
    from .pretrain import DEFAULTS, pretrain_tiny_clip

    over = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed") if getattr(args, k) is not None}
    path = pretrain_tiny_clip(Path(args.cache_dir) if args.cache_dir else None, force=args.force,
                              progress=not args.no_progress, **over)
    meta = path.parent / "pretrain.json"
    print(f"weights: {path}")
    if meta.exists():
        print(f"zero-shot accuracy on the DG pool: {json.loads(meta.read_text())['zero_shot_dg_pool']}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .engine import TrainConfig, run_training

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**state["config"])
    hist = state["history"]
    from .engine import _select

    chosen = _select(hist, cfg.selection)
    print(json.dumps({"method": cfg.method, "dataset": cfg.dataset, "test_domain": "+".join(cfg.test_domains),
                      "seed": cfg.seed, "step_in_checkpoint": state["step"], "selected_step": chosen["step"],
                      "test_acc": chosen["test_acc"], "val_acc": chosen["val_acc"],
                      "test": chosen["test"]}, indent=2))
    return 0


def cmd_quickstart(args) -> int:
    from .results import format_table, plot, summarise, write_csv, load_results

    t0 = time.time()
    args.backbone, args.pretrained = "tiny-digits", "default"
    _ensure_pretrained(args)
    for method in QUICKSTART["methods"]:
        args.steps, args.eval_every = args.steps or QUICKSTART["steps"], QUICKSTART["eval_every"]
        hp = QUICKSTART["hparams"].get(method, {})
        for cfg in _train_configs(args, method, QUICKSTART["dataset"], "all", hp):
            rec = __import__("dgclip.engine", fromlist=["run_training"]).run_training(cfg)
            print(f"{method:>10s} held-out {rec['test_domain']:6s} seed {rec['seed']}: "
                  f"test acc {100 * rec['test_acc']:.1f}%", flush=True)
    rows = summarise(load_results(Path(args.output_dir) / "results.jsonl"))
    print()
    print(format_table(rows))
    write_csv(rows, Path(args.output_dir) / "results_test_acc.csv")
    plot(rows, Path(args.output_dir) / "results_test_acc.png")
    print()
    protocols_cli.quickstart_base2new(args)
    print(f"quickstart finished in {time.time() - t0:.0f} s; results in {args.output_dir}")
    return 0


def _sweep_jobs(args):
    from .sweep import make_grid

    hparams = json.loads(args.hparams) if args.hparams else {}
    train = {"root": args.root, "backbone": args.backbone, "pretrained": args.pretrained, "cache_dir": args.cache_dir,
             "eval_every": args.eval_every, "holdout_fraction": args.holdout_fraction, "device": args.device,
             "precision": args.precision, "progress": not args.no_progress, "workers": args.workers,
             "feature_cache_budget_gb": args.feature_cache_budget_gb, "train_domains": args.train_domains}
    return make_grid(args.sweep_dir, args.methods, args.datasets, args.test_domains, args.n_hparams, args.n_trials,
                     steps=args.steps, hparams=hparams, hparams_seed_start=args.hparams_seed_start, **train)


def cmd_sweep(args) -> int:
    from .sweep import delete_incomplete, launch, list_jobs

    jobs = _sweep_jobs(args)
    if args.action == "list":
        rows = list_jobs(jobs)
        for status, key in rows:
            print(f"{status:13s} {key}")
        counts = {s: sum(1 for r in rows if r[0] == s) for s in ("done", "incomplete", "not launched")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(rows)} jobs)")
        return 0
    if args.action == "delete_incomplete":
        removed = delete_incomplete(jobs)
        print(f"deleted {len(removed)} incomplete job(s)" + "".join(f"\n  {k}" for k in removed))
        return 0
    _ensure_pretrained(args)
    options = {}
    if args.launcher == "submitit":
        options = {"cluster": args.submitit_cluster, **json.loads(args.submitit_options or "{}")}
    before = {k: s for s, k in list_jobs(jobs)}
    after = launch(jobs, args.launcher, **options)
    ran = sum(1 for k in after if before[k] != "done")
    print(f"{sum(1 for s in after.values() if s == 'done')}/{len(jobs)} jobs done ({ran} launched now, "
          f"{len(jobs) - ran} already done); results: dgclip results {args.sweep_dir}")
    return 0 if all(s == "done" for s in after.values()) else 1


def _add_common(p, *, steps_default=300):
    p.add_argument("--root", default=_default_root(), help="data root holding DomainBed-layout datasets")
    p.add_argument("--output-dir", default="runs/dgclip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backbone", default="tiny-digits", help="open_clip model name or tiny-digits")
    p.add_argument("--pretrained", default="default", help="open_clip tag, weights file, or 'none'")
    p.add_argument("--cache-dir", default=None, help="weights and feature cache (default ~/.cache/dgclip)")
    p.add_argument("--steps", type=int, default=steps_default)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--hparams-seed", type=int, default=0, help="0 = paper defaults, >0 = random search draw")
    p.add_argument("--holdout-fraction", type=float, default=0.2)
    p.add_argument("--selection", choices=["training-domain", "oracle", "last-epoch", "oracle-best-test-epoch"],
                   default="training-domain", help="loo: training-domain | oracle; CoOp suite: last-epoch "
                   "(default) | oracle-best-test-epoch")
    p.add_argument("--train-domains", nargs="+", default=None, help="sources (one = single-source DG)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs, skip finished ones")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader worker processes (default: one per CPU core, at most 8); results do not depend on it")
    p.add_argument("--feature-cache-budget-gb", type=float, default=None,
                   help="largest frozen-feature cache a run may write (default 64); above it features are computed on the fly")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dgclip", description="CLIP-based domain generalization on open_clip")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the embedded tiny CLIP (cached)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_pretrain)
    p = sub.add_parser("train", help="train one method, leave-one-domain-out")
    p.add_argument("--method", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--test-domain", default="all", help="a domain, 'a,b' (held out together) or 'all'")
    p.add_argument("--hparams", default=None, help="JSON overrides of the method's hyper-parameters")
    _add_common(p)
    protocols_cli.add_train_arguments(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="report the selected evaluation stored in a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("results", help="DomainBed-style table (+ CSV, PNG) from results.jsonl")
    p.add_argument("dir")
    p.add_argument("--metric", default="test_acc")
    protocols_cli.add_results_arguments(p)
    p.set_defaults(fn=cmd_results)
    p = sub.add_parser("sweep", help="DomainBed-style grid: launch | delete_incomplete | list")
    p.add_argument("action", choices=["launch", "delete_incomplete", "list"])
    p.add_argument("--sweep-dir", required=True, help="one folder per job, plus sweep.json")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--test-domains", nargs="+", default=["all"], help="domains (or 'a,b' groups); 'all' = each in turn")
    p.add_argument("--n-hparams", type=int, default=1, help="hparam seeds per cell (0 = paper defaults, then draws)")
    p.add_argument("--hparams-seed-start", type=int, default=0)
    p.add_argument("--n-trials", type=int, default=1, help="trial seeds (data splits) per cell")
    p.add_argument("--hparams", default=None, help="JSON overrides: {name: value} or {method: {name: value}}")
    p.add_argument("--launcher", choices=["local", "multi_gpu", "submitit"], default="local")
    p.add_argument("--submitit-cluster", default=None, help="None = auto (SLURM when present), 'local' or 'debug'")
    p.add_argument("--submitit-options", default=None, help='JSON executor parameters, e.g. {"slurm_partition": "gpu", '
                                                              '"gpus_per_node": 1, "timeout_min": 600}')
    _add_common(p)
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("datasets", help="list and verify the datasets under a root")
    p.add_argument("--root", required=True)
    p.add_argument("--quick", action="store_true", help="skip opening every image")
    p.set_defaults(fn=cmd_datasets)
    p = sub.add_parser("quickstart", help="embedded default end to end: pretrain + 4 baselines + table")
    _add_common(p, steps_default=None)
    # three seeds by default: the table's mean +- standard error is then meaningful (~1-2 min on 2 cores)
    p.set_defaults(fn=cmd_quickstart, output_dir=None, seeds=[0, 1, 2])
    return ap


def main(argv=None) -> int:
    from .backbone import BackboneError
    from .data.catalog import UnknownDatasetError
    from .data.domainbed import DataError
    from .methods import UnknownMethodError

    args = build_parser().parse_args(argv)
    if args.command == "quickstart" and args.output_dir in (None, "runs/dgclip"):
        args.output_dir = "runs/quickstart"
    try:
        return args.fn(args)
    except (DataError, UnknownMethodError, UnknownDatasetError, BackboneError, FileNotFoundError,
            ValueError, json.JSONDecodeError) as exc:
        print(f"dgclip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
