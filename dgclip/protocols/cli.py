"""Command-line pieces of the CoOp-suite protocols: `dgclip train --protocol ...`, the protocol
tables of `dgclip results` (with `--paper`), the base-to-new part of the quickstart. Light at import
(argparse only); torch is imported inside the run functions."""
from __future__ import annotations

import sys

from . import PROTOCOLS, SUITE_PROTOCOLS

__all__ = ["add_train_arguments", "add_results_arguments", "is_suite_run", "run_train", "run_results",
           "quickstart_base2new", "QUICKSTART_BASE2NEW"]

# the quickstart's base-to-new part: the three prompt learners with their embedded presets
QUICKSTART_BASE2NEW = {"methods": ["zero-shot", "coop", "cocoop", "gopro"], "dataset": "rotated-digits", "shots": 16}


class ParserDefault(str):
    """A flag's default value, told apart from the same value given on the command line: the
    suite protocols take the backbone from the preset unless one is named."""


def add_train_arguments(p) -> None:
    """Call after the common flags exist on `p`."""
    p.set_defaults(**{k: ParserDefault(p.get_default(k)) for k in ("backbone", "pretrained")
                      if isinstance(p.get_default(k), str)})
    p.add_argument("--protocol", choices=PROTOCOLS, default="loo",
                   help="loo = leave-one-domain-out (DomainBed datasets); the others run the CoOp few-shot "
                        "suite (see docs/protocols/few-shot.md)")
    p.add_argument("--shots", type=int, default=None, help="images per class (CoOp suite; default: the preset's 16)")
    p.add_argument("--epochs", type=int, default=None, help="CoOp suite: epochs (default: the preset's)")
    p.add_argument("--targets", nargs="+", default=None,
                   help="cross-dataset / imagenet-shift: target datasets (default: the protocol's list)")


def add_results_arguments(p) -> None:
    p.add_argument("--paper", nargs="?", const="auto", default=None,
                   help="print ours beside a published table (gopro-base2new, gopro-cross-dataset, "
                        "gopro-imagenet-shift; no value: the one matching the records)")


def is_suite_run(args) -> bool:
    """True for a CoOp-suite protocol. For `loo` the backbone flags go back to plain strings, so
    the engine's records and checkpoints hold no marker object."""
    suite = getattr(args, "protocol", "loo") != "loo"
    if not suite:
        for k in ("backbone", "pretrained"):
            if isinstance(getattr(args, k, None), ParserDefault):
                setattr(args, k, str(getattr(args, k)))
    return suite


def _selection(args) -> str:
    sel = getattr(args, "selection", "training-domain")
    if sel in ("training-domain", "last-epoch"):
        return "last-epoch"  # CoOp/CoCoOp report the last epoch; there is no domain validation here
    if sel == "oracle-best-test-epoch":
        return sel
    raise ValueError(f"--selection {sel} does not apply to --protocol {args.protocol}; use last-epoch "
                     "(default) or oracle-best-test-epoch (GOPro's released selection, an oracle)")


def config_from_args(args, method: str, seed: int, dataset: str = None, hparams: dict = None):
    from .runner import ProtocolConfig

    dataset = dataset or args.dataset
    explicit = lambda v: None if v is None or isinstance(v, ParserDefault) else str(v)  # noqa: E731
    return ProtocolConfig(
        method=method, dataset=dataset, root=args.root, protocol=args.protocol, shots=args.shots, seed=seed,
        output_dir=args.output_dir, backbone=explicit(args.backbone), pretrained=explicit(args.pretrained),
        cache_dir=args.cache_dir, epochs=args.epochs, hparams=hparams or {}, selection=_selection(args),
        targets=args.targets, device=args.device, precision=args.precision, progress=not args.no_progress,
        workers=args.workers)


def _line(rec: dict) -> str:
    head = f"{rec['method']:>10s} {rec['dataset']} {rec['protocol']} k={rec['shots']} seed={rec['seed']}"
    if rec["protocol"] == "base2new":
        body = f"base={100 * rec['base_acc']:.2f} new={100 * rec['new_acc']:.2f} hm={100 * rec['hm']:.2f}"
    else:
        body = f"test={100 * rec['test_acc']:.2f}"
    if rec.get("target_acc"):
        body += f" target avg={100 * rec['target_avg']:.2f}"
    return f"{head} {body} ({rec['selection']}, epoch {rec['selected_epoch']}/{rec['epochs']}, " \
           f"{rec['n_train_images']} train images)"


def run_train(args, hparams: dict) -> int:
    from .runner import run_protocol

    if args.protocol not in SUITE_PROTOCOLS:
        raise ValueError(f"unknown protocol {args.protocol!r}")
    from ..commands._training import ensure_pretrained as _ensure_pretrained
    from .embedded import EMBEDDED_SUITE

    if args.dataset == EMBEDDED_SUITE:
        _ensure_pretrained(args)  # the tiny CLIP's weights, pretrained once
    for seed in args.seeds:
        rec = run_protocol(config_from_args(args, args.method, seed, hparams=hparams))
        print(_line(rec), flush=True)
    return 0


def run_results(args) -> int:
    from .report import format_paper_comparison, format_protocol_tables, load_protocol_records

    records = load_protocol_records(args.dir)
    if not records:
        print(f"no CoOp-suite protocol records in {args.dir}", file=sys.stderr)
        return 1
    print(format_protocol_tables(records))
    if args.paper is not None:
        print()
        print(format_paper_comparison(records, args.paper))
    return 0


def quickstart_base2new(args) -> list[dict]:
    """Base-to-new on the embedded default: each method once per seed, then the table."""
    from .report import format_protocol_tables
    from .runner import ProtocolConfig, run_protocol

    recs = []
    for method in QUICKSTART_BASE2NEW["methods"]:
        for seed in args.seeds:
            explicit = lambda v: None if v is None or isinstance(v, ParserDefault) else str(v)  # noqa: E731
            cfg = ProtocolConfig(method=method, dataset=QUICKSTART_BASE2NEW["dataset"], root=args.root,
                                 protocol="base2new", shots=QUICKSTART_BASE2NEW["shots"], seed=seed,
                                 epochs=getattr(args, "epochs", None), backbone=explicit(getattr(args, "backbone", None)),
                                 pretrained=explicit(getattr(args, "pretrained", None)),
                                 output_dir=str(args.output_dir) + "/base2new", cache_dir=args.cache_dir,
                                 device=args.device, precision=args.precision, progress=not args.no_progress,
                                 workers=args.workers)
            rec = run_protocol(cfg)
            print(_line(rec), flush=True)
            recs.append(rec)
    print()
    print(format_protocol_tables(recs))
    return recs


def print_suite_datasets(args) -> int:
    """`dgclip datasets`: the CoOp-suite datasets under the root, verified (a missing split file or
    image named)."""
    from ..data.coop_suite import verify_suite

    print("CoOp few-shot suite:")
    found = 0
    for rep in verify_suite(args.root, check_images=not args.quick):
        if not rep["found"]:
            print(f"  {rep['dataset']:16s} not found ({rep['path']})")
            continue
        found += 1
        if rep["problems"]:
            print(f"  {rep['dataset']:16s} {len(rep['problems'])} problem(s)")
            for p in rep["problems"]:
                print(f"      - {p}")
        else:
            c = rep["counts"]
            print(f"  {rep['dataset']:16s} OK: {rep['num_classes']} classes, train {c['train']}, val {c['val']}, "
                  f"test {c['test']}")
    print(f"{found} CoOp-suite dataset(s) found under {args.root}")
    return 0
