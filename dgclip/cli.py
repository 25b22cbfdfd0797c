"""`dgclip` command line. Each verb is a module with `add_parser(subparsers)` (flags only, no torch
import) and `run(args) -> int` (the work, heavy imports inside); VERBS lists them, one line each,
so `dgclip --help` and argument errors answer without importing torch."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

__all__ = ["main", "build_parser", "VERBS"]

# verb -> module (dgclip/commands/<verb>.py unless a module path is given); one line per verb
VERBS = {
    "pretrain": "dgclip.commands.pretrain",
    "train": "dgclip.commands.train",
    "eval": "dgclip.commands.eval",
    "results": "dgclip.commands.results",
    "sweep": "dgclip.commands.sweep",
    "datasets": "dgclip.commands.datasets",
    "quickstart": "dgclip.commands.quickstart",
    "download": "dgclip.commands.download",
    "reproduce": "dgclip.commands.reproduce",
    "describe": "dgclip.commands.describe",
}

# Optional dependencies: the module a user lacks -> the extra that installs it (pyproject.toml).
EXTRAS = {"open_clip": "dgclip", "matplotlib": "dgclip", "sklearn": "dgclip", "tqdm": "dgclip", "PIL": "dgclip",
          "diffusers": "diffusion", "transformers": "diffusion", "submitit": "slurm", "yaml": None}


def build_parser() -> argparse.ArgumentParser:
    from .cli_flags import TopHelpFormatter, help_epilog

    ap = argparse.ArgumentParser(prog="dgclip", description="CLIP-based domain generalization on open_clip",
                                 epilog=help_epilog(), formatter_class=TopHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="VERB")
    for verb, module in VERBS.items():
        mod = importlib.import_module(module)
        p = mod.add_parser(sub)
        p.set_defaults(_module=module)
    return ap


def _user_errors() -> tuple:
    """The exception classes that mean bad input (a message, not a traceback). Looked up only in
    modules already imported: an error raised before torch was loaded must not load it now."""
    found = [FileNotFoundError, ValueError, NotADirectoryError]
    for module, names in (("dgclip.data.domainbed", ("DataError",)), ("dgclip.data.catalog", ("UnknownDatasetError",)),
                          ("dgclip.methods", ("UnknownMethodError",)), ("dgclip.backbone", ("BackboneError",)),
                          ("dgclip.data.verify", ("UnreadableImagesError",))):
        mod = sys.modules.get(module)
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


def _missing_dependency(exc: ImportError, verb: str) -> str:
    """What to install, when `exc` (or an error it was raised from) is a missing optional module."""
    seen, top = exc, ""
    while seen is not None and top not in EXTRAS:
        top = (getattr(seen, "name", None) or "").split(".")[0] if isinstance(seen, ImportError) else ""
        seen = seen.__cause__ or seen.__context__
    if top not in EXTRAS:
        return ""
    extra = EXTRAS[top]
    how = (f"pip install -e '.[{extra}]' in a checkout (or add '{extra}' to the extras of scripts/install.sh)"
           if extra else f"pip install {'pyyaml' if top == 'yaml' else top}")
    return f"`dgclip {verb}` needs the Python package {top!r}, which is not installed: {how}"


def _resume_hint(argv: list[str], verb: str) -> str:
    if verb == "sweep":
        return "dgclip " + shlex.join(argv)  # launch resumes incomplete jobs by itself
    return "dgclip " + shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv  # what was typed: a verb may refuse a flag given where it would be ignored
    run = importlib.import_module(args._module).run
    try:
        return run(args)
    except ImportError as exc:
        msg = _missing_dependency(exc, args.command)
        if not msg:
            raise
        print(f"dgclip: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop (which checkpoints and raises RunInterrupted)
        print("dgclip: interrupted outside a training loop (nothing to checkpoint); runs already finished are "
              f"recorded: {_resume_hint(argv, args.command)} skips them", file=sys.stderr)
        return 130
    except BaseException as exc:
        from .run_guard import RunInterrupted

        if isinstance(exc, RunInterrupted):
            print(f"dgclip: {exc}; resume with: {_resume_hint(argv, args.command)}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, _user_errors()):
            print(f"dgclip: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
