"""Applying a preset to `dgclip train` / `dgclip sweep`: explicit flags win, the rest comes from
the preset, and the run's record stores every resolved value with its source.

Run settings go to the run's flags (steps, eval_every, backbone, pretrained, holdout_fraction);
every other preset key is a method hyper-parameter, below the `--hparams` JSON. A preset given in
epochs (CoOp, CoCoOp and SeeCLIP count epochs; the engine counts steps that draw `batch_size`
images from each source domain) becomes steps = ceil(epochs x (1 - holdout) x N / (D x batch)),
N the dataset's (known-class) images and D its domains: one pass over the sources' training
images per epoch, averaged over which domain is held out.
"""
from __future__ import annotations

import argparse
import math
from . import PRESET_NAMES, RUN_KEYS, resolve

__all__ = ["add_preset_flag", "explicit_dests", "resolve_run", "apply_to_train_args", "preset_sweep_jobs",
           "epochs_to_steps", "FLAG_OF"]

# preset run key -> argparse dest / flag spelling
FLAG_OF = {"steps": "--steps", "eval_every": "--eval-every", "backbone": "--backbone", "pretrained": "--pretrained",
           "holdout_fraction": "--holdout-fraction"}


def add_preset_flag(parser) -> None:
    parser.add_argument("--preset", choices=PRESET_NAMES, default=None,
                        help="paper: each (method, dataset)'s published settings, every value with its source "
                             "(see `dgclip reproduce --dry-run`); embedded: the tiny-CLIP toy default. "
                             "Explicit flags and --hparams override a preset")


def explicit_dests(argv) -> set:
    """The argparse dests the user typed (abbreviations included): the CLI parser re-run with
    every default suppressed, so only given options appear in the namespace."""
    from ..cli import build_parser

    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
        p.set_defaults(**{k: argparse.SUPPRESS for k in list(p._defaults)})
    ns, _ = parser.parse_known_args(list(argv))
    # parser-level defaults (set_defaults) are copied into the namespace even when SUPPRESS
    return {k for k, v in vars(ns).items() if v != argparse.SUPPRESS}


def epochs_to_steps(dataset: str, root, epochs: int, batch_size: int, holdout: float) -> tuple:
    """(steps, how) for a preset given in epochs; needs the dataset under `root`."""
    from ..data.catalog import get_spec
    from ..data.domainbed import scan

    spec = get_spec(dataset)
    records = scan(root, spec)
    if spec.open_set is not None:
        known = {spec.classes.index(c) for c in spec.open_set.known}
        n = sum(1 for lab in records.labels if int(lab) in known)
    else:
        n = len(records)
    d = len(spec.domains)
    steps = max(1, math.ceil(epochs * (1 - holdout) * n / (d * batch_size)))
    return steps, (f"project: {epochs} epochs -> ceil({epochs} x {1 - holdout:g} x {n} images / "
                   f"({d} domains x batch {batch_size})) = {steps} steps")


def _suite_run_settings() -> tuple:
    """Run settings that only the CoOp-suite protocols read (dgclip.presets.coop_suite)."""
    try:
        from .coop_suite import RUN_SETTINGS
    except ModuleNotFoundError:
        return ()
    return RUN_SETTINGS


def _method_keys(method: str) -> set:
    from ..methods import get_method

    return set(get_method(method).all_defaults())


def resolve_run(preset: str, method: str, dataset: str, *, explicit_run: dict, explicit_hparams: dict,
                root=None) -> tuple:
    """(run settings, method hparams, record) for one (method, dataset).

    explicit_run: {run key: value} the user typed; explicit_hparams: the `--hparams` JSON for this
    method. record = {"name", "values", "sources"}: what the run used and where each value is from.
    """
    table = resolve(preset, method, dataset)
    suite_only = sorted(k for k in table if k in _suite_run_settings() and k not in RUN_KEYS)
    if suite_only:
        raise ValueError(f"the {preset} preset for ({method}, {dataset}) configures the CoOp few-shot suite "
                         f"(it sets {', '.join(suite_only)}): run it with `dgclip train --protocol base2new` "
                         "(or few-shot, cross-dataset, imagenet-shift), which applies it by itself")
    keys = _method_keys(method)
    unknown = sorted(k for k in table if k not in RUN_KEYS and k not in keys)
    if unknown:
        raise ValueError(f"preset {preset!r} for ({method}, {dataset}) sets {unknown}, which {method} does not have")
    values = {k: v.value for k, v in table.items()}
    srcs = {k: v.source for k, v in table.items()}
    for k, v in explicit_run.items():
        values[k], srcs[k] = v, f"command line: {FLAG_OF.get(k, k)}"
    for k, v in explicit_hparams.items():
        values[k], srcs[k] = v, "command line: --hparams"
    if "epochs" in values and "steps" not in explicit_run:
        batch = int(values.get("batch_size") or 32)
        hold = float(values.get("holdout_fraction", 0.2))
        values["steps"], srcs["steps"] = epochs_to_steps(dataset, root, int(values["epochs"]), batch, hold)
    run = {k: values[k] for k in RUN_KEYS if k in values and k != "epochs"}
    hparams = {k: v for k, v in values.items() if k not in RUN_KEYS}
    return run, hparams, {"name": preset, "values": values, "sources": srcs}


def _hparams_dict(value) -> dict:
    """--hparams as the CLI parsed it (a dict) or as JSON text."""
    import json

    if isinstance(value, dict):
        return value
    return json.loads(value) if value else {}


def _explicit(args, dests: set) -> dict:
    return {k: getattr(args, k) for k in FLAG_OF if k in dests}


def apply_to_train_args(args, argv) -> None:
    """`dgclip train --preset NAME`: fill the run flags and hparams from the preset in place."""
    if getattr(args, "preset", None) is None:
        return
    if getattr(args, "protocol", "loo") != "loo":
        raise ValueError(f"--preset applies to leave-one-domain-out runs; --protocol {args.protocol} always uses "
                         "its paper configuration (dgclip/presets/coop_suite.py), overridden by --shots/--epochs "
                         "and --hparams")
    dests = explicit_dests(argv)
    user_hp = _hparams_dict(args.hparams)
    run, hparams, record = resolve_run(args.preset, args.method, args.dataset, explicit_run=_explicit(args, dests),
                                       explicit_hparams=user_hp, root=args.root)
    for k, v in run.items():
        setattr(args, k, v)
    args.hparams = hparams
    args.preset_record = record


def preset_sweep_jobs(args, argv) -> list:
    """The jobs of `dgclip sweep --preset NAME` (and of `dgclip reproduce`): one grid per
    (method, dataset) cell, each with its own resolved preset.

    The preset's hyper-parameters hold for every hparam seed, as `--hparams` does: a random search
    (--n-hparams > 1) then varies only the names the preset does not set."""
    import sys

    from ..sweep import make_grid

    dests = explicit_dests(argv) if argv is not None else set()
    user = _hparams_dict(args.hparams)
    per_method = bool(user) and all(isinstance(v, dict) for v in user.values()) and set(user) <= set(args.methods)
    explicit_run = _explicit(args, dests)
    if args.n_hparams > 1:
        print(f"[dgclip] --preset {args.preset} with --n-hparams {args.n_hparams}: the preset's hyper-parameters "
              "are fixed in every draw; the search varies only the names it does not set", file=sys.stderr)
    jobs = []
    for dataset in args.datasets:
        for method in args.methods:
            over = user.get(method, {}) if per_method else user
            run, hparams, record = resolve_run(args.preset, method, dataset, explicit_run=explicit_run,
                                               explicit_hparams=over, root=args.root)
            train = {"root": args.root, "backbone": args.backbone, "pretrained": args.pretrained,
                     "cache_dir": args.cache_dir, "eval_every": args.eval_every,
                     "holdout_fraction": args.holdout_fraction, "device": args.device, "precision": args.precision,
                     "progress": not args.no_progress, "workers": args.workers,
                     "feature_cache_budget_gb": args.feature_cache_budget_gb, "train_domains": args.train_domains,
                     "skip_unreadable": getattr(args, "skip_unreadable", False), "preset": record}
            steps = run.pop("steps", args.steps)
            train.update(run)
            jobs += make_grid(args.sweep_dir, [method], [dataset], args.test_domains, args.n_hparams, args.n_trials,
                              steps=steps, hparams=hparams, hparams_seed_start=args.hparams_seed_start, **train)
    return jobs
