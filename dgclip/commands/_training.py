"""What the training verbs (train, quickstart, sweep) share once their flags are parsed."""
from __future__ import annotations

import sys
from pathlib import Path

from ..cli_flags import default_root, resolve_device


def finish_args(args) -> None:
    """Fill the defaults that need a look at the machine (kept out of parser building)."""
    if getattr(args, "root", "") is None:
        args.root = default_root()
    if hasattr(args, "device"):
        args.device = resolve_device(args.device)


def train_configs(args, method, dataset, test_domain, hparams):
    from ..data.catalog import get_spec
    from ..data.splits import resolve_test_domains
    from ..engine import TrainConfig

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
                              workers=args.workers, feature_cache_budget_gb=args.feature_cache_budget_gb,
                              skip_unreadable=args.skip_unreadable,
                              preset=getattr(args, "preset_record", None) or {})


def read_domains(spec, test_domains, train_domains) -> tuple:
    """The domains one run reads, in catalogue order (as dgclip.engine checks them)."""
    return tuple(d for d in spec.domains if d in set(test_domains) | set(train_domains or spec.domains))


def check_images_first(configs, root, cache_dir, skip_unreadable: bool) -> dict:
    """Every image the runs will read, decoded before the first of them starts (each run's own
    check then hits the cache): one unreadable file stops a multi-run command before any work,
    not after its first runs. Returns {(dataset, domains): data identity}."""
    from ..data.catalog import get_spec
    from ..data.domainbed import scan
    from ..data.embedded import ensure_rotated_digits
    from ..paths import default_cache_dir
    from ..run_guard import checked_records

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    identity = {}
    for dataset, test_domains, train_domains in configs:
        spec = get_spec(dataset)
        read = read_domains(spec, test_domains, train_domains)
        if (dataset, read) in identity:
            continue
        if spec.embedded:
            ensure_rotated_digits(root)
        identity[(dataset, read)] = checked_records(spec, scan(root, spec, list(read)), list(read),
                                                    cache_dir=cache, skip_unreadable=skip_unreadable)[1]
    return identity


def ensure_pretrained(args) -> None:
    from ..pretrain import pretrain_tiny_clip
    from ..tiny_clip import EMBEDDED_MODELS, weights_path

    if args.backbone in EMBEDDED_MODELS and args.pretrained in ("default", "dgclip-pretrain"):
        path = weights_path(args.backbone, Path(args.cache_dir) if args.cache_dir else None)
        if not path.exists():
            print(f"[dgclip] no cached {args.backbone} weights: pretraining once -> {path}", file=sys.stderr)
            pretrain_tiny_clip(Path(args.cache_dir) if args.cache_dir else None, progress=not args.no_progress)


def init_distributed() -> bool:
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def finish_distributed(started: bool, ok: bool) -> None:
    """Tear down a process group this command started. After a successful run, first wait for every
    rank (a rank that exits while its peer still talks to gloo aborts the peer); after an error,
    never wait (the peers may be stuck elsewhere: torchrun stops them)."""
    import torch.distributed as dist

    if started and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
