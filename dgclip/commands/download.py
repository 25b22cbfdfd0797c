"""`dgclip download NAME --root DIR [--mirror URL] [--no-verify]`."""
from __future__ import annotations

import sys

__all__ = ["add_parser", "run"]


def add_parser(subparsers):
    p = subparsers.add_parser("download", help="fetch, unpack and verify a dataset (DomainBed, Dassl, CoOp suite)",
                              description="Download NAME into --root. Every file is fetched with resume and "
                                          "retries, checked against its sha256 where one is known (else the "
                                          "digest is written to the dataset's dgclip-download.json), unpacked "
                                          "beside the target and moved into place only once it verifies. "
                                          "`dgclip download list` names every dataset.")
    p.add_argument("name", help="dataset name, or 'list'")
    p.add_argument("--root", default=None, help="data root (default: $DGCLIP_DATA or ~/.cache/dgclip/data)")
    p.add_argument("--mirror", default=None, help="fetch every file from URL/<file name> instead (a lab copy)")
    p.add_argument("--no-verify", action="store_true", help="accept a file whose known sha256 differs "
                                                            "(a mirror's re-packed copy); corrupt archives still fail")
    p.add_argument("--keep-archives", action="store_true", help="keep the fetched archives after installing")
    p.add_argument("--retries", type=int, default=5, help="attempts per file after the first (exponential backoff)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    from ..data.download import SOURCES, DownloadError, download

    if args.name == "list":
        for name, src in sorted(SOURCES.items()):
            how = "manual (login)" if src.manual else f"{len(src.files)} file(s)"
            print(f"  {name:16s} -> {src.target:24s} {how}")
        return 0
    root = args.root
    if root is None:
        from ..cli_flags import default_root as _default_root

        root = _default_root()
    if args.retries < 0:
        print("dgclip: error: --retries must be >= 0", file=sys.stderr)
        return 2
    try:
        path = download(args.name, root, mirror=args.mirror, verify=not args.no_verify,
                        progress=not args.no_progress, retries=args.retries, keep_archives=args.keep_archives)
    except DownloadError as exc:
        print(f"dgclip: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
