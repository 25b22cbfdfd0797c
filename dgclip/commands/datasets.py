"""`dgclip datasets --root DIR`: what is under a data root, checked; non-zero exit on a problem
that would stop a run (unreadable images, unknown class folders, missing domains)."""
from __future__ import annotations

from ..cli_flags import HelpFormatter


def add_parser(subparsers):
    p = subparsers.add_parser("datasets", help="list and verify the datasets under a root", formatter_class=HelpFormatter,
                              description="Registered datasets found under ROOT, every other folder there (a "
                                          "DomainBed-layout folder is usable by path; others say why not), and "
                                          "every unreadable image by name. Exit status 1 when anything would "
                                          "stop a run.")
    p.add_argument("--root", required=True, help="the folder holding the dataset folders")
    p.add_argument("--quick", action="store_true", help="skip decoding every image")
    p.add_argument("--cache-dir", default=None, help="image-check cache (default $DGCLIP_CACHE, else ~/.cache/dgclip)")
    return p


def _print_report(label: str, rep: dict) -> None:
    status = "OK" if not rep["problems"] else f"{len(rep['problems'])} problem(s)"
    counts = ", ".join(f"{d}: {n}" for d, n in rep["domains"].items())
    print(f"  {label:16s} {status}: {counts}")
    for p in rep["problems"]:
        print(f"      - {p}")
    for path, why in rep["unreadable"]:  # every one, by name
        print(f"          {path}: {why}")


def run(args) -> int:
    from pathlib import Path

    from ..data.catalog import get_spec, list_datasets
    from ..data.domainbed import DataError, verify
    from ..data.folder import folder_spec, inspect_folder
    from ..paths import default_cache_dir

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(f"data root {args.root} does not exist")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    seen, found, errors = set(), 0, 0
    for key in list_datasets():
        spec = get_spec(key)
        if spec.dirname in seen:
            continue
        seen.add(spec.dirname)
        rep = verify(root, spec, check_images=not args.quick, cache_dir=cache)
        if not rep["found"]:
            print(f"  {spec.name:16s} not found ({rep['path']})")
            continue
        found += 1
        errors += rep["errors"]
        _print_report(spec.name, rep)
    from ..data.coop_suite import SPECS as SUITE_SPECS

    seen |= {Path(s.path(root)).relative_to(root).parts[0] for s in SUITE_SPECS.values()}  # listed below
    others = sorted(p for p in root.iterdir() if p.name not in seen and not p.name.startswith("."))
    if others:
        print(f"not a registered dataset folder under {root}:")
    for p in others:
        if not p.is_dir():
            print(f"  {p.name:16s} not recognised: a file, not a dataset folder")
            continue
        _domains, _classes, why = inspect_folder(p)
        if why:
            print(f"  {p.name:16s} not recognised: {'; '.join(why)}")
            continue
        spec = folder_spec(p)
        rep = verify(root, spec, check_images=not args.quick, cache_dir=cache)
        found += 1
        errors += rep["errors"]
        print(f"  {p.name:16s} a DomainBed-layout folder ({len(spec.domains)} domains, {len(spec.classes)} "
              f"classes): use it with --dataset {p}")
        _print_report("", rep)
    print(f"{found} dataset(s) found under {root}" + (f"; {errors} problem(s) that would stop a run" if errors else ""))
    from ..protocols import cli as protocols_cli

    suite_rc = protocols_cli.print_suite_datasets(args)
    return 1 if errors or suite_rc else 0
