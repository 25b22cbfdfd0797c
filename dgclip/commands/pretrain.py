"""`dgclip pretrain`: the embedded tiny CLIP, pretrained once and cached."""
from __future__ import annotations

from ..cli_flags import HelpFormatter, float_range, int_at_least


def add_parser(subparsers):
    p = subparsers.add_parser("pretrain", help="pretrain the embedded tiny CLIP (cached)", formatter_class=HelpFormatter)
    p.add_argument("--cache-dir", default=None, help="default $DGCLIP_CACHE, else ~/.cache/dgclip")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="default: dgclip.pretrain.DEFAULTS")
    p.add_argument("--batch-size", type=int_at_least(1), default=None)
    p.add_argument("--lr", type=float_range(0.0, float("inf")), default=None)
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--force", action="store_true", help="pretrain again even if cached")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    import json
    from pathlib import Path

    from ..pretrain import pretrain_tiny_clip

    over = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed") if getattr(args, k) is not None}
    path = pretrain_tiny_clip(Path(args.cache_dir) if args.cache_dir else None, force=args.force,
                              progress=not args.no_progress, **over)
    meta = path.parent / "pretrain.json"
    print(f"weights: {path}")
    if meta.exists():
        print(f"zero-shot accuracy on the DG pool: {json.loads(meta.read_text())['zero_shot_dg_pool']}")
    return 0
