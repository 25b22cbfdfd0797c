"""One CoOp-suite run: (method, dataset, protocol, shots, seed) -> a results record.

Steps: read the dataset as CoOp does (dgclip.data.coop_suite, or the embedded default), draw the
few-shot train/val lists (dgclip.data.fewshot), cut base/new classes when asked (base2new.py),
train for whole epochs over a seeded permutation per epoch (Dassl's RandomSampler; the last
partial batch dropped when the list holds a full batch, `data_manager.py` L43) under Dassl's
epoch schedule (schedule.py), and test the LAST epoch's model (CoOp/CoCoOp report it:
Dassl `TEST.FINAL_MODEL="last_step"`). `selection="oracle-best-test-epoch"` reproduces GOPro's
released script (the epoch with the best base-class TEST accuracy, its model then also scored on
new classes): an oracle, named so in the record and in every table.

Image features of the frozen image tower are computed once per evaluation list and cached on disk
(and for training too when the train view is the eval view); the text side runs through the
methods' batched prompt encoders (dgkernels.encode_prompts / PromptEncoder): one call per step
whatever the number of classes.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import SUITE_PROTOCOLS
from .base2new import harmonic_mean, subsample_classes

__all__ = ["ProtocolConfig", "run_protocol", "SELECTIONS", "resolve_settings"]

SELECTIONS = ("last-epoch", "oracle-best-test-epoch")


@dataclass
class ProtocolConfig:
    method: str
    dataset: str
    root: str
    protocol: str = "base2new"
    shots: Optional[int] = None     # None: the preset's (16)
    seed: int = 1
    output_dir: str = "runs"
    backbone: Optional[str] = None  # None: the preset's
    pretrained: Optional[str] = None
    cache_dir: Optional[str] = None
    epochs: Optional[int] = None    # None: the preset's
    hparams: dict = field(default_factory=dict)
    selection: str = "last-epoch"
    targets: Optional[list] = None  # cross-dataset / imagenet-shift: None = the protocol's list
    device: str = "cpu"
    precision: str = "auto"
    progress: bool = True
    workers: Optional[int] = None
    eval_batch_size: Optional[int] = None
    transforms: Optional[str] = None  # "dassl" | "method"; None: the preset's


def run_key(cfg: ProtocolConfig, shots: int) -> str:
    return (f"{cfg.method}__{cfg.dataset}__{cfg.protocol}__k{shots}__s{cfg.seed}__{cfg.selection}"
            ).replace("/", "_").replace(" ", "_")


def resolve_settings(cfg: ProtocolConfig, method_cls) -> tuple[dict, dict, dict]:
    """(run settings, method hparams, sources): preset values for (method, dataset), then the
    config's explicit values on top."""
    from ..cli_flags import UNTRAINED_METHODS
    from ..presets.coop_suite import PRESETS, RUN_SETTINGS, protocol_overrides
    from ..provenance import sources as sources_of
    from .embedded import EMBEDDED_SUITE

    embedded = cfg.dataset == EMBEDDED_SUITE
    preset = {**PRESETS.get((cfg.method, cfg.dataset), {}),
              **protocol_overrides(cfg.method, cfg.protocol, cfg.dataset)}
    srcs = sources_of(preset)
    known = set(method_cls.all_defaults())
    hparams = method_cls.defaults_for(embedded)
    hparams.update({k: v.value for k, v in preset.items() if k in known})
    run = {k: v.value for k, v in preset.items() if k in RUN_SETTINGS}
    for k in ("shots", "epochs", "backbone", "pretrained", "eval_batch_size", "transforms"):
        value = getattr(cfg, k)
        if value is not None:
            run[k] = value
            srcs[k] = "project: set for this run"
    run.setdefault("shots", 16)
    run.setdefault("warmup_epochs", 1)
    run.setdefault("warmup_lr", 1e-5)
    run.setdefault("transforms", "method")
    run.setdefault("eval_batch_size", 100)
    run.setdefault("backbone", "ViT-B-16")
    run.setdefault("pretrained", "openai")
    if "epochs" not in run and "budget_steps" not in run and cfg.method not in UNTRAINED_METHODS:
        raise ValueError(f"no preset for ({cfg.method}, {cfg.dataset}): pass --epochs")
    unknown = set(cfg.hparams) - known
    if unknown:
        raise ValueError(f"unknown hyper-parameters for {cfg.method}: {sorted(unknown)}")
    hparams.update(cfg.hparams)
    for k in cfg.hparams:
        srcs[k] = "project: set for this run (--hparams)"
    return run, hparams, srcs


def _load(dataset: str, root):
    from ..data.coop_suite import load_suite
    from .embedded import EMBEDDED_SUITE, load_embedded

    return load_embedded(root) if dataset == EMBEDDED_SUITE else load_suite(dataset, root)


def _records(items):
    from ..data.domainbed import Records

    return Records([it.impath for it in items], np.asarray([it.label for it in items], dtype=np.int64),
                   np.zeros(len(items), dtype=np.int64))


def _names(items, what: str) -> list[str]:
    from ..data.coop_suite.items import classnames_by_label

    return classnames_by_label(items, what)


def transfer_state(src, dst) -> None:
    """Copy what a method learned (trainable parameters, BatchNorm statistics) into the same method
    built for other classes. Class-dependent tensors (the class-name token buffers) are not copied;
    a learned tensor whose shape depends on the classes (CoOp's class-specific contexts) cannot
    move to new classes and is an error."""
    import torch

    learned = {n for n, p in src.named_parameters() if p.requires_grad}
    for mod_name, mod in src.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            learned |= {f"{mod_name}.{b}" for b, _ in mod.named_buffers(recurse=False)}
    s_state, d_state = src.state_dict(), dst.state_dict()
    for name in sorted(learned):
        if name not in d_state:
            raise ValueError(f"{src.name}: learned tensor {name} has no counterpart in the new-class model")
        if d_state[name].shape != s_state[name].shape:
            raise ValueError(f"{src.name}: learned tensor {name} has shape {tuple(s_state[name].shape)}, which "
                             f"depends on the classes ({tuple(d_state[name].shape)} for the new ones); "
                             "class-specific parameters cannot be tested on other classes")
    dst.load_state_dict({n: s_state[n] for n in learned}, strict=False)


class _EpochBatches:
    """Dassl's train batches: a fresh seeded permutation per epoch, the last partial batch dropped
    when the list holds at least one full batch."""

    def __init__(self, n: int, batch_size: int, generator):
        self.n, self.bs, self.gen = n, batch_size, generator
        self.per_epoch = n // batch_size if n >= batch_size else 1
        self._queue = []

    def draw(self, generator=None):
        import torch

        if not self._queue:
            perm = torch.randperm(self.n, generator=generator or self.gen)
            if self.n >= self.bs:
                self._queue = [perm[i * self.bs:(i + 1) * self.bs] for i in range(self.per_epoch)]
            else:
                self._queue = [perm]
        return self._queue.pop(0)


def run_protocol(cfg: ProtocolConfig) -> dict:
    import torch

    from ..backbone import default_cache_dir, load_backbone
    from ..data.cache import compute_features, feature_cache_key
    from ..data.domainbed import ImageDataset
    from ..data.fewshot import fewshot_split
    from ..data.loader import StepSampler, default_workers, train_loader
    from ..data.splits import seed_hash
    from ..data.transfer import split_device_stage, stage_in_loader
    from ..engine import _Split, _logits, _versions, append_record
    from ..methods import Batch, get_method
    from ..data.coop_suite import CROSS_DATASET_TARGETS, IMAGENET_SHIFT_TARGETS
    from .schedule import dassl_scheduler
    from .transforms import dassl_train_transform

    if cfg.protocol not in SUITE_PROTOCOLS:
        raise ValueError(f"protocol must be one of {SUITE_PROTOCOLS}, got {cfg.protocol!r}")
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {cfg.selection!r}")
    method_cls = get_method(cfg.method)
    run, hparams, srcs = resolve_settings(cfg, method_cls)
    shots = int(run["shots"])
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    if cfg.protocol in ("cross-dataset", "imagenet-shift"):
        default_targets = CROSS_DATASET_TARGETS if cfg.protocol == "cross-dataset" else IMAGENET_SHIFT_TARGETS
        targets = list(cfg.targets or default_targets)
    else:
        if cfg.targets:
            raise ValueError(f"--targets applies to cross-dataset and imagenet-shift, not {cfg.protocol}")
        targets = []
    out_dir = Path(cfg.output_dir)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    t_start = time.time()

    # ---- data: CoOp's lists, few-shot draw, class halves ----------------------------------------
    data = _load(cfg.dataset, cfg.root)
    if data.test_only:
        raise ValueError(f"{cfg.dataset} is test-only (an ImageNet variant); train on imagenet")
    few = fewshot_split(data.name, data.train, data.val, shots, cfg.seed, base_dir=data.dataset_dir,
                        cache_dir=cache_dir / "fewshot", sample_val=cfg.dataset != "imagenet")
    train_items, val_items, test_items = few["train"], few["val"], data.test
    new_test = None
    if cfg.protocol == "base2new":
        train_items, val_items, test_items = subsample_classes(train_items, val_items, data.test, subsample="base")
        (new_test,) = subsample_classes(few["train"], data.test, subsample="new")[1:]
    base_names = _names(train_items, f"{cfg.dataset} few-shot train")
    new_names = []
    if new_test is not None:  # names by label from the train list, as Dassl's lab2cname
        new_names = _names(subsample_classes(few["train"], subsample="new")[0], f"{cfg.dataset} new classes")

    # ---- model --------------------------------------------------------------------------------
    device = torch.device(cfg.device)
    backbone = load_backbone(run["backbone"], run["pretrained"], cache_dir=cache_dir, device=device,
                             precision=cfg.precision)
    from ..data.coop_suite.templates import prompt_name

    def build(names):
        torch.manual_seed(seed_hash(cfg.seed, "init"))
        m = method_cls(backbone, [prompt_name(n) for n in names], 1, hparams)
        return m.to(device)

    method = build(base_names)
    workers = default_workers() if cfg.workers is None else int(cfg.workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    pin = device.type == "cuda"
    eval_tf = backbone.preprocess_val
    if run["transforms"] == "dassl" and method.uses_frozen_features:
        train_tf = dassl_train_transform(eval_tf)  # CoOp / CoCoOp: Dassl's crop + flip
        train_view = "dassl: random resized crop (0.08-1, bicubic) + flip"
    elif run["transforms"] in ("dassl", "method"):
        train_tf = method.make_train_transform(eval_tf)  # GOPro: its own views; embedded: as tuned
        train_view = "eval view" if train_tf is eval_tf else f"{cfg.method}'s own training views"
    else:
        raise ValueError(f"transforms must be 'dassl' or 'method', got {run['transforms']!r}")
    wid = str(getattr(backbone, "weights_id", f"{backbone.name}:{backbone.pretrained}"))

    def split(items, tf, name, cache: bool):
        host_tf, stage = split_device_stage(tf)
        ds = ImageDataset(_records(items), host_tf)
        feats = None
        if cache:  # the frozen tower's features: computed once per (images, view), reused by every run
            key = feature_cache_key(backbone, name, [it.impath for it in items], tf,
                                    patches=method.needs_patches, layer_stats=method.needs_layer_stats,
                                    weights_id=wid)
            feats = compute_features(backbone, ds, patches=method.needs_patches,
                                     layer_stats=method.needs_layer_stats, cache_dir=cache_dir / "features",
                                     key=key, workers=workers, pin=pin, device_stage=stage)
        return _Split(ds, feats, workers, pin, stage, stage_in_loader(device))

    train_cached = method.uses_frozen_features and train_tf is eval_tf
    train = split(train_items, train_tf, data.name, train_cached)
    test = split(test_items, eval_tf, data.name, True)
    eval_bs = int(run["eval_batch_size"])

    def accuracy_of(m, s) -> float:
        logits = _logits(m, s, eval_bs, device, cfg.seed)
        return float((logits.argmax(1) == s.labels).float().mean()) if len(s) else float("nan")

    # ---- training -----------------------------------------------------------------------------
    bs = int(hparams.get("batch_size", 32))
    gen = torch.Generator().manual_seed(seed_hash(cfg.seed, "batches"))
    batches_src = _EpochBatches(len(train), bs, gen)
    trainable = bool(method.trainable_parameters())
    if not trainable:
        epochs = 0  # zero-shot: nothing to train, one evaluation
    elif "epochs" in run:
        epochs = int(run["epochs"])
    elif "budget_steps" in run:
        epochs = max(1, math.ceil(int(run["budget_steps"]) / batches_src.per_epoch))
    else:
        raise ValueError(f"no preset for ({cfg.method}, {cfg.dataset}): pass --epochs")
    if trainable and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    steps = epochs * batches_src.per_epoch
    if trainable:
        method.configure_optimizers(steps)
        if method.optimizer is not None:
            method.scheduler = dassl_scheduler(method.optimizer, steps_per_epoch=batches_src.per_epoch,
                                               max_epoch=epochs, warmup_epochs=int(run["warmup_epochs"]),
                                               warmup_lr=float(run["warmup_lr"]))
    torch.manual_seed(seed_hash(cfg.seed, "train"))
    loader = None
    if steps and train.feats is None:
        sampler = StepSampler(lambda g: batches_src.draw(g), gen, 0, steps)
        loader = iter(train_loader(train.ds, cfg.seed, sampler, workers=workers, pin=pin,
                                   device_stage=train.loader_stage))
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"{cfg.method} {cfg.dataset} {cfg.protocol} k{shots} s{cfg.seed}",
               disable=not cfg.progress, leave=False)
    history, losses, best = [], [], None
    t0 = time.time()
    for step in range(steps):
        batch = Batch(*next(loader), device_stage=train.batch_stage) if loader is not None \
            else train.batch(batches_src.draw())
        method.train()
        out = method.update(batch.to(device))
        losses.append(float(out.get("loss", 0.0)))
        bar.update(1)
        if (step + 1) % batches_src.per_epoch == 0:
            epoch = (step + 1) // batches_src.per_epoch
            entry = {"epoch": epoch, "loss": float(np.mean(losses[-batches_src.per_epoch:]))}
            if cfg.selection.startswith("oracle"):  # GOPro's released selection: TEST accuracy each epoch
                entry["test_acc"] = accuracy_of(method, test)
                if best is None or entry["test_acc"] > best[0]:
                    best = (entry["test_acc"], epoch, copy.deepcopy(method.method_state_dict()))
            history.append(entry)
    bar.close()
    loader = None
    train_seconds = time.time() - t0
    selected_epoch = epochs if trainable else 0
    if best is not None:
        selected_epoch = best[1]
        method.load_state_dict(best[2], strict=False)

    # ---- evaluation ---------------------------------------------------------------------------
    record_metrics: dict = {}
    own_acc = accuracy_of(method, test)
    if cfg.protocol == "base2new":
        new_method = build(new_names)
        transfer_state(method, new_method)
        new_acc = accuracy_of(new_method, split(new_test, eval_tf, data.name, True))
        record_metrics = {"base_acc": own_acc, "new_acc": new_acc, "hm": harmonic_mean(own_acc, new_acc)}
    else:
        record_metrics = {"test_acc": own_acc}
    if targets:
        per_target = {}
        for t in targets:
            tdata = _load(t, cfg.root)
            tm = build(tdata.classnames)
            transfer_state(method, tm)
            per_target[t] = accuracy_of(tm, split(tdata.test, eval_tf, tdata.name, True))
        record_metrics.update({"source_acc": own_acc, "target_acc": per_target,
                               "target_avg": float(np.mean(list(per_target.values())))})

    selection = ("last epoch" if cfg.selection == "last-epoch"
                 else "oracle: best test epoch (GOPro's released script)")
    record = {
        "run_key": run_key(cfg, shots), "method": cfg.method, "dataset": data.name, "protocol": cfg.protocol,
        "shots": shots, "seed": cfg.seed, "selection": selection, "selected_epoch": selected_epoch,
        "epochs": epochs, "steps": steps, "batch_size": bs, "steps_per_epoch": batches_src.per_epoch,
        **record_metrics,
        "base_classes": base_names, "new_classes": new_names, "targets": targets,
        "n_train_images": len(train_items), "n_val_images": len(val_items), "n_test_images": len(test_items),
        "n_new_test_images": len(new_test) if new_test is not None else 0,
        "fewshot_cache": few.get("cache"), "train_features_cached": train.feats is not None,
        "train_transform": train_view,
        "hparams": hparams, "settings": run, "sources": srcs, "config": asdict(cfg), "versions": _versions(),
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained},
        "history": history, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "train_seconds": round(train_seconds, 2), "total_seconds": round(time.time() - t_start, 2),
    }
    append_record(out_dir / "results.jsonl", record)
    return record
