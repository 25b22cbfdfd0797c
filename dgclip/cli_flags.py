"""Flags of the `dgclip` verbs, declared once and validated by argparse (no torch import here).

A flag's value is checked by its `type` (ranges, JSON objects) or `choices`, so a bad value is
refused before anything runs with a message naming the flag ("argument --steps: must be an
integer >= 1, got 0"). A flag that exists on a sibling verb but does not apply to this one is
registered with `reject(...)`: using it is an error that says what to use instead, never a
value silently ignored.

The name lists below (methods, datasets, protocols) appear in `--help` without importing the
registries (which import torch); tests/test_cli.py checks them against the registries.
"""
from __future__ import annotations

import argparse
import json
import os

__all__ = ["METHODS", "DATASETS", "SUITE_DATASETS", "PROTOCOLS", "UNTRAINED_METHODS", "given", "int_at_least", "float_range", "json_object", "reject",
           "add_flags", "TRAIN_FLAGS", "help_epilog", "HelpFormatter", "TopHelpFormatter", "default_root", "resolve_device"]

METHODS = ("zero-shot", "coop", "cocoop", "dpl", "dalsclip", "gopro", "seeclip")
DATASETS = ("pacs", "vlcs", "officehome", "terraincognita", "domainnet", "digits-dg", "mini-domainnet",
            "rotated-digits", "pacs-open", "pacs-open-odgclip", "vlcs-open", "vlcs-open-odgclip",
            "officehome-open", "officehome-open-medic", "mini-domainnet-open", "digits-dg-open",
            "digits-dg-open-odgclip", "rotated-digits-open")
# the CoOp few-shot suite (--protocol few-shot | base2new | cross-dataset | imagenet-shift)
SUITE_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                  "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
                  "imagenet_a", "imagenet_r")
# methods with nothing to train: --steps / --eval-every given to them would be ignored
UNTRAINED_METHODS = ("zero-shot",)
PROTOCOLS = {
    "loo": "leave-one-domain-out (default): each --test-domain in turn, the others are sources; "
           "--train-domains picks the sources (one = single-source DG); open-set with a *-open dataset "
           "or an open-set split file",
    "few-shot": "CoOp suite, all classes, --shots K per class, last epoch reported (train, sweep)",
    "base2new": "CoOp suite: train on the base half (first ceil(n/2) sorted labels), test base and new; "
                "base_acc, new_acc, hm (train, sweep)",
    "cross-dataset": "CoOp suite: train on ImageNet, test on the 10 other datasets (train, sweep)",
    "imagenet-shift": "CoOp suite: train on ImageNet, test on ImageNet-V2/-Sketch/-A/-R (train, sweep)",
}


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help, unless it has none (None, False) or the help states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {shown})".strip()


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`dgclip --help`: the epilog's lists keep their layout."""


def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_range(lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {value}")
        return value

    parse.__name__ = "number"
    return parse


def json_object(text: str) -> dict:
    """A JSON object, e.g. '{"lr": 0.002}' (argparse names the flag in its error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at character {exc.pos}): {text!r}; expected an object such as "
            "'{\"lr\": 0.002}' (keys in double quotes, the whole value in single quotes in a shell)") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{name: value}}, got {type(value).__name__}: {text!r}")
    return value


json_object.__name__ = "JSON object"


class _Reject(argparse.Action):
    def __init__(self, option_strings, dest, why: str = "", **kw):
        self.why = why
        super().__init__(option_strings, dest, nargs="*", help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"argument {option_string}: does not apply to `{parser.prog}`; {self.why}")


def reject(parser: argparse.ArgumentParser, flag: str, why: str) -> None:
    """`flag` is an error on this verb (it exists on a sibling verb); `why` says what to use."""
    parser.add_argument(flag, action=_Reject, why=why, dest=f"_rejected_{flag.lstrip('-').replace('-', '_')}",
                        default=argparse.SUPPRESS)


def given(args, flag: str) -> bool:
    """Whether `flag` was typed on the command line (not just defaulted)."""
    return any(a == flag or a.startswith(flag + "=") for a in getattr(args, "_argv", ()))


def default_root() -> str:
    """$DGCLIP_DATA, else <cache>/data (dgclip.paths, no torch)."""
    from .paths import default_cache_dir

    return os.environ.get("DGCLIP_DATA", str(default_cache_dir() / "data"))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# The flags a training verb may take: name -> (argparse args, kwargs). Verbs pick theirs by name
# with add_flags(...) and reject() the rest that a user could expect from a sibling verb.
TRAIN_FLAGS = {
    "root": (("--root",), dict(default=None, help="data root holding registered DomainBed-layout datasets "
                                                  "(default: $DGCLIP_DATA, else ~/.cache/dgclip/data); "
                                                  "a dataset given by path ignores it")),
    "output-dir": (("--output-dir",), dict(default="runs/dgclip", help="where results.jsonl and checkpoints go")),
    "seeds": (("--seeds",), dict(type=int_at_least(0), nargs="+", default=[0], help="trial seeds (data splits)")),
    "backbone": (("--backbone",), dict(default="tiny-digits", help="open_clip model name, or tiny-digits "
                                                                  "(the embedded CLIP)")),
    "pretrained": (("--pretrained",), dict(default="default", help="open_clip tag, weights file, or 'none'")),
    "cache-dir": (("--cache-dir",), dict(default=None, help="weights, feature and image-check cache "
                                                           "(default $DGCLIP_CACHE, else ~/.cache/dgclip)")),
    "steps": (("--steps",), dict(type=int_at_least(1), default=300, help="training steps per run")),
    "eval-every": (("--eval-every",), dict(type=int_at_least(1), default=50, help="evaluate (and checkpoint) "
                                                                                 "every N steps")),
    "hparams-seed": (("--hparams-seed",), dict(type=int_at_least(0), default=0,
                                               help="0 = the method's defaults, >0 = a random-search draw")),
    "holdout-fraction": (("--holdout-fraction",), dict(type=float_range(0.0, 1.0), default=0.2,
                                                       help="per-domain validation (out) split, as DomainBed")),
    "selection": (("--selection",), dict(choices=["training-domain", "oracle", "last-epoch", "oracle-best-test-epoch"],
                                         default="training-domain",
                                         help="model selection; loo: training-domain | oracle (uses the target, "
                                              "labelled so); CoOp suite: last-epoch (what training-domain means "
                                              "there) | oracle-best-test-epoch (GOPro's released selection)")),
    "train-domains": (("--train-domains",), dict(nargs="+", default=None, help="sources (one = single-source DG); "
                                                                              "default: every other domain")),
    "device": (("--device",), dict(default="auto", help="auto = cuda when available, else cpu")),
    "precision": (("--precision",), dict(choices=["auto", "fp32", "bf16"], default="auto",
                                         help="numeric precision of the backbone")),
    "resume": (("--resume",), dict(action="store_true", help="continue interrupted runs, skip finished ones "
                                                             "(refused if settings or data changed)")),
    "no-progress": (("--no-progress",), dict(action="store_true")),
    "workers": (("--workers",), dict(type=int_at_least(0), default=None,
                                     help="data loader worker processes (default: one per CPU core, at most 8); "
                                          "results do not depend on it")),
    "feature-cache-budget-gb": (("--feature-cache-budget-gb",), dict(
        type=float_range(0.0, float("inf"), lo_open=False), default=None,
        help="largest frozen-feature cache a run may write (default 64); above it features are computed on the fly")),
    "skip-unreadable": (("--skip-unreadable",), dict(action="store_true",
                                                     help="leave unreadable images out (named in the record) "
                                                          "instead of refusing to start")),
}


def add_flags(parser: argparse.ArgumentParser, names, **defaults) -> None:
    """Add the named TRAIN_FLAGS; keyword arguments (dest names: output_dir=...) override defaults."""
    for name in names:
        args, kw = TRAIN_FLAGS[name]
        kw = dict(kw)
        dest = name.replace("-", "_")
        if dest in defaults:
            kw["default"] = defaults[dest]
        parser.add_argument(*args, **kw)


def help_epilog() -> str:
    import textwrap

    from .paths import default_cache_dir

    def item(label: str, text: str) -> str:
        return textwrap.fill(text, 100, break_on_hyphens=False, initial_indent=f"{label:11s}", subsequent_indent=" " * 11)

    return "\n".join([
        item("methods:", ", ".join(METHODS)),
        item("datasets:", ", ".join(DATASETS) + "; or a path: a DomainBed-layout folder "
             "<folder>/<domain>/<class>/<image>, or an open-set split file (.json) of class-name lists "
             "(docs/guides/own-data.md)"),
        item("", "CoOp suite (with --protocol): " + ", ".join(SUITE_DATASETS)),
        *[item("protocols:" if i == 0 else "", f"{k}: {v}") for i, (k, v) in enumerate(PROTOCOLS.items())],
        item("defaults:", f"data root $DGCLIP_DATA, else {default_cache_dir() / 'data'}; cache $DGCLIP_CACHE, "
             f"else {default_cache_dir()}; device cuda when available, else cpu"),
        "`dgclip VERB --help` shows each verb's flags with their defaults.",
    ])
