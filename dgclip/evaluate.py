"""Score a trained checkpoint on any dataset whose classes it was trained on.

`dgclip eval --checkpoint C --dataset D [--test-domain X]`: the method is rebuilt from the
checkpoint's config and hyper-parameters, loaded with the checkpoint's weights (those of the step
it was saved at, which is the last evaluated step, not necessarily the selected one: the record
says so), and every image of each chosen domain of D is scored (closed-set accuracy over the
training classes, matched by class name). Images are checked up front as in training. One record
per domain is appended to OUTPUT_DIR/results.jsonl, so `dgclip results` tabulates it.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

__all__ = ["evaluate_checkpoint"]


def _config(state: dict):
    from .engine import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in state["config"].items() if k in known})


def evaluate_checkpoint(checkpoint: str, dataset: str, *, root: str, test_domain: str = "all",
                        output_dir: str = "runs/dgclip-eval", device: str = "cpu", cache_dir=None,
                        workers=None, skip_unreadable: bool = False, precision: str = "auto") -> list[dict]:
    import numpy as np
    import torch

    from .backbone import default_cache_dir, load_backbone
    from .data.catalog import get_spec
    from .data.domainbed import DataError, ImageDataset, scan
    from .data.embedded import ensure_rotated_digits
    from .data.loader import default_workers
    from .data.splits import resolve_test_domains
    from .data.transfer import split_device_stage, stage_in_loader
    from .engine import _logits, _Split, _versions, append_record
    from .methods import get_method
    from .metrics import accuracy
    from .run_guard import checked_records

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "method_state" not in state or "config" not in state:
        raise DataError(f"{checkpoint} is not a dgclip training checkpoint")
    cfg = _config(state)
    trained_spec = None
    classnames = state.get("classnames")
    if classnames is None:  # checkpoints written before the class names were stored in them
        trained_spec = get_spec(cfg.dataset)
        classnames = [trained_spec.classname(c) for c in trained_spec.classes]
    n_sources = len(state.get("source_domains") or []) or None
    if n_sources is None:
        trained_spec = trained_spec or get_spec(cfg.dataset)
        n_sources = len(cfg.train_domains or [d for d in trained_spec.domains if d not in cfg.test_domains])
    spec = get_spec(dataset)
    if spec.open_set is not None:
        raise DataError(f"--dataset {dataset}: eval scores closed-set accuracy over the training classes; "
                        "an open-set dataset needs a training run (dgclip train)")
    label_of = {name: i for i, name in enumerate(classnames)}
    foreign = [c for c in spec.classes if spec.classname(c) not in label_of]
    if foreign:
        raise DataError(f"--dataset {dataset}: class(es) {foreign[:8]} were not among the checkpoint's "
                        f"training classes {classnames[:8]}{' ...' if len(classnames) > 8 else ''}")
    label_map = np.asarray([label_of[spec.classname(c)] for c in spec.classes], dtype=np.int64)
    groups = resolve_test_domains(spec, test_domain)
    if spec.embedded:
        ensure_rotated_digits(root)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    domains = sorted({d for g in groups for d in g}, key=spec.domains.index)
    records, data = checked_records(spec, scan(root, spec, domains), domains, cache_dir=cache,
                                    skip_unreadable=skip_unreadable)
    dev = torch.device(device)
    backbone = load_backbone(cfg.backbone, cfg.pretrained, cache_dir=cache, device=dev, precision=precision)
    method = get_method(cfg.method)(backbone, classnames, n_sources, state["hparams"])
    method.to(dev)
    method.load_checkpoint_state(state["method_state"])
    host_tf, device_stage = split_device_stage(backbone.preprocess_val)
    n_workers = default_workers() if workers is None else int(workers)
    out = []
    for group in groups:
        idx = [spec.domains.index(d) for d in group]
        recs = records.subset(np.flatnonzero(np.isin(records.domains, idx)))
        ds = ImageDataset(recs, host_tf, label_map=label_map,
                          domain_map=np.full(len(spec.domains), -1, dtype=np.int64))
        split = _Split(ds, None, n_workers, dev.type == "cuda", device_stage, stage_in_loader(dev))
        logits = _logits(method, split, cfg.eval_batch_size, dev, cfg.seed)
        acc = accuracy(logits, split.labels)
        record = {
            "run_key": f"eval__{Path(checkpoint).stem}__{spec.name}__{'+'.join(group)}".replace("/", "_").replace(" ", "_"),
            "method": cfg.method, "dataset": spec.name, "test_domain": "+".join(group), "seed": cfg.seed,
            "hparams_seed": cfg.hparams_seed,
            "selection": f"checkpoint weights (step {state['step']}, the last saved)",
            "test_acc": float(acc), "selected_step": state["step"], "n_test": len(split),
            "checkpoint": str(Path(checkpoint).resolve()),
            "trained_on": {"dataset": cfg.dataset, "test_domains": cfg.test_domains,
                           "source_domains": state.get("source_domains")},
            "transductive": bool(method.transductive), "hparams": state["hparams"], "config": state["config"],
            "data": data, "classnames": classnames, "versions": _versions(),
        }
        append_record(Path(output_dir) / "results.jsonl", record)
        out.append(record)
    return out
