"""`dgclip describe --method M [--dataset D]`: every hyper-parameter of a method with its value
and its source (paper section or equation, released file and line, or the project's reason),
the names its random search draws, and, with --dataset, the values a run on that dataset uses
(the embedded default's data-fact overrides; a preset when the presets package has one)."""
from __future__ import annotations

__all__ = ["add_parser", "run", "describe_method"]


def add_parser(subparsers):
    p = subparsers.add_parser("describe", help="every hyper-parameter of a method with its value and source")
    p.add_argument("--method", default=None, help="a method name (default: every method)")
    p.add_argument("--dataset", default=None, help="show the values a run on this dataset uses")
    p.add_argument("--preset", default=None, help="a preset name from dgclip.presets (with --dataset)")
    return p


def describe_method(name: str, dataset: str | None = None, preset: str | None = None) -> str:
    from ..methods import get_method
    from ..methods.base import HparamRNG
    from ..provenance import format_table

    cls = get_method(name)
    embedded = False
    if dataset is not None:
        from ..data.catalog import get_spec

        embedded = get_spec(dataset).embedded
    table = cls.sourced_defaults(embedded=embedded)
    if preset is not None:
        if dataset is None:
            raise ValueError("--preset needs --dataset")
        try:
            from ..presets import resolve
        except ImportError as exc:
            raise ValueError(f"presets are not available in this build ({exc})") from exc
        table = {**table, **resolve(preset, name, dataset)}
    rng = HparamRNG(1)
    cls.search_space(rng)
    where = f" on {dataset}" if dataset else ""
    lines = [f"{name}{where}: {len(table)} hyper-parameters (value, source)", format_table(table)]
    if rng.names:
        lines.append(f"random search (hparams seed >= 1) draws: {', '.join(sorted(rng.names))}; "
                     f"lr log-uniform over [default / 10, default * 10]")
    return "\n".join(lines)


def run(args) -> int:
    from ..methods import list_methods

    names = [args.method] if args.method else list_methods()
    print("\n\n".join(describe_method(n, args.dataset, args.preset) for n in names))
    return 0
