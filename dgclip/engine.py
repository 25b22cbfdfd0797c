"""Training engine: one run = (method, dataset, held-out domains, seed).

DomainBed conventions: per-domain seeded 80/20 in/out splits, evaluation every `eval_every`
steps, model selection by training-domain validation (mean accuracy on the sources' out-splits;
ties -> earliest), target-domain selection only when asked and then labelled "oracle" (DomainBed's
oracle: the LAST step, scored on the target; dgclip.selection). Batches draw `batch_size` images
with replacement from EACH source domain per step (DomainBed, DPL; `batch_scope` "per_domain") or
`batch_size` in total from the pooled sources (Dassl's loader: CoOp, CoCoOp, GOPro) from a
seeded generator whose state is checkpointed, so `--resume` continues to the same result as an
uninterrupted run. Evaluation scores seeded random batches (`eval_order`), never the
class-by-class file listing; a transductive method pools over its paper's eval batch size. Under torchrun every rank draws the same
global batch and keeps its own slice; the method runs wrapped in DistributedDataParallel, which
averages the gradients across ranks. Only the engine places the method on its device and sets
its train/eval mode; the losses stay on the device until they are logged.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .backbone import ImageFeatures, default_cache_dir, load_backbone
from .data.cache import CachePlan, compute_features, feature_cache_key, plan_cache
from .data.catalog import get_spec
from .data.domainbed import DataError, ImageDataset, scan
from .data.embedded import ensure_rotated_digits
from .data.loader import StepSampler, collate, default_workers, eval_loader, train_loader
from .data.sampling import DomainBalancedBatches, eval_order
from .data.splits import make_protocol, seed_hash
from .data.transfer import split_device_stage, stage_in_loader
from .methods import Batch, get_method
from .metrics import accuracy, calibrate_threshold, closed_set_accuracy, open_set_metrics
from .run_guard import InterruptGuard, RunInterrupted, checked_records, data_identity_diff
from .provenance import sources as _provenance_sources
from .selection import select_in_run

__all__ = ["TrainConfig", "run_training", "append_record", "read_records", "run_key"]


@dataclass
class TrainConfig:
    method: str
    dataset: str
    root: str
    test_domains: list
    seed: int = 0
    output_dir: str = "runs"
    backbone: str = "tiny-digits"
    pretrained: str = "default"
    cache_dir: Optional[str] = None
    steps: int = 300
    eval_every: int = 50
    hparams_seed: int = 0
    hparams: dict = field(default_factory=dict)
    holdout_fraction: float = 0.2
    selection: str = "training-domain"  # or "oracle"
    train_domains: Optional[list] = None
    eval_batch_size: int = 256
    device: str = "cpu"
    precision: str = "auto"
    progress: bool = True
    resume: bool = False
    feature_cache: bool = True
    feature_cache_budget_gb: Optional[float] = None  # above it features are computed on the fly
    track_oracle: bool = False  # also score the targets' out-splits (sweeps: both DomainBed selections)
    workers: Optional[int] = None  # loader worker processes (None: default_workers()); never changes results
    skip_unreadable: bool = False  # leave unreadable images out (named in the record) instead of refusing
    preset: dict = field(default_factory=dict)  # {"name", "values", "sources"} of a --preset (dgclip.presets)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_key(cfg: TrainConfig) -> str:
    return (f"{cfg.method}__{cfg.dataset}__{'+'.join(cfg.test_domains)}__s{cfg.seed}"
            f"__h{cfg.hparams_seed}__{cfg.selection}").replace("/", "_").replace(" ", "_")


# Config fields that change a run's result; the others (paths, workers, progress, device) do not.
_RESULT_FIELDS = ("backbone", "pretrained", "steps", "eval_every", "holdout_fraction", "train_domains",
                  "precision", "eval_batch_size", "track_oracle", "skip_unreadable")


def _check_resumable(stored: dict, hparams: dict, cfg: TrainConfig, what: str, data: dict) -> None:
    """`--resume` reuses a record or checkpoint only if it was made with the same hyper-parameters
    and result-relevant config: the run key names (method, dataset, domains, seeds, selection), not
    `--hparams`, `--steps` or a changed default, and silently reusing those would mix settings."""
    def norm(d):  # as the JSON record stores it (tuples -> lists, keys sorted)
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    if "hparams" not in stored:
        diffs = ["the stored run does not record its hyper-parameters"]
    else:
        old_hp, new_hp = norm(stored["hparams"]), norm(hparams)
        diffs = [f"hparams.{k}: {old_hp.get(k, '(absent)')!r} -> {new_hp.get(k, '(absent)')!r}"
                 for k in sorted(old_hp.keys() | new_hp.keys()) if old_hp.get(k) != new_hp.get(k)]
    old_cfg, new_cfg = norm(stored.get("config") or {}), norm(asdict(cfg))
    diffs += [f"{f}: {old_cfg[f]!r} -> {new_cfg.get(f)!r}" for f in _RESULT_FIELDS
              if f in old_cfg and old_cfg[f] != new_cfg.get(f)]
    diffs += data_identity_diff(stored, data)  # the run key names the dataset, not its files
    if diffs:
        raise ValueError(f"--resume: the {what} was made with other settings ({'; '.join(diffs)}); "
                         "use another --output-dir, or delete that record/checkpoint to rerun")


def _versions() -> dict:
    import open_clip

    return {"dgclip": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line with a single write (no half-written lines), then fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Split:
    """Images (decoded in loader workers, finished by `device_stage` in the loader or on the
    device: dgclip.data.transfer) or cached features of one set of records, with method
    labels/domains."""

    def __init__(self, ds: ImageDataset, feats: Optional[ImageFeatures], workers: int = 0, pin: bool = False,
                 device_stage=None, stage_in_loader: bool = True):
        self.ds, self.feats, self.workers, self.pin = ds, feats, workers, pin
        self.device_stage = device_stage
        # who applies device_stage to the loader's batches: the loader, or Batch.to
        self.loader_stage, self.batch_stage = (device_stage, None) if stage_in_loader else (None, device_stage)
        self.labels = torch.as_tensor(ds.labels, dtype=torch.long)
        self.domains = torch.as_tensor(ds.domains, dtype=torch.long)
        self._loaders = {}  # (order, batch size) -> persistent evaluation loader

    def __len__(self):
        return len(self.ds)

    def batch(self, idx: torch.Tensor) -> Batch:
        if self.feats is not None:
            return Batch(None, self.labels[idx], self.domains[idx], self.feats.index(idx))
        return Batch(*collate([self.ds[int(i)] for i in idx]), device_stage=self.device_stage)

    def batches(self, order: torch.Tensor, bs: int):
        """Batches of the items in `order`, `bs` at a time (images: through a persistent loader)."""
        if self.feats is not None:
            for start in range(0, len(order), bs):
                yield self.batch(order[start:start + bs])
            return
        key = (hash(order.numpy().tobytes()), bs)
        if key not in self._loaders:
            sub = torch.utils.data.Subset(self.ds, order.tolist())
            self._loaders[key] = eval_loader(sub, bs, workers=self.workers, pin=self.pin,
                                             device_stage=self.loader_stage)
        for images, labels, domains in self._loaders[key]:
            yield Batch(images, labels, domains, device_stage=self.batch_stage)


def eval_batch_size(method, default: int) -> int:
    """A transductive method pools over its paper's eval batch; others any size (speed only)."""
    return int(method.eval_batch_size) if method.transductive else int(default)


@torch.no_grad()
def _logits(method, split: _Split, bs: int, device, seed: int = 0) -> torch.Tensor:
    """Logits in the split's order, computed over seeded random batches (`eval_order`)."""
    method.eval()
    n = len(split)
    if n == 0:
        return torch.zeros(0, method.num_classes)
    bs = eval_batch_size(method, bs)
    order = torch.from_numpy(eval_order(split.ds.records.paths, seed_hash(seed, "eval")))
    out = []
    for b in split.batches(order, bs):
        b = b.to(device)
        out.append(method.predict(b.features if b.features is not None else b.original()).float().cpu())
    scored = torch.cat(out)
    logits = torch.empty_like(scored)
    logits[order] = scored
    return logits


def _evaluate(method, val, test, oracle, protocol, cfg, device) -> dict:
    C = protocol.num_classes
    val_logits = {d: _logits(method, s, cfg.eval_batch_size, device, cfg.seed) for d, s in val.items()}
    val_accs = {d: closed_set_accuracy(val_logits[d], s.labels, C) for d, s in val.items()}
    entry = {"val_acc": float(np.mean(list(val_accs.values()))), "val_acc_by_domain": val_accs}
    threshold = None
    if protocol.open_set:  # the common rule: calibrated on SOURCE validation only (metrics.py)
        threshold = calibrate_threshold(torch.cat(list(val_logits.values())), C)
    tests, all_logits = {}, {}
    for d, s in test.items():
        lg = all_logits[d] = _logits(method, s, cfg.eval_batch_size, device, cfg.seed)
        if protocol.open_set:
            m = open_set_metrics(lg, s.labels, C, threshold)
            m["acc"] = m["closed_acc"]
        else:
            m = {"acc": accuracy(lg, s.labels)}
        tests[d] = m
    # several held-out domains at once: pool by sample count
    n = {d: len(s) for d, s in test.items()}
    entry["test"] = tests
    entry["test_acc"] = float(sum(tests[d]["acc"] * n[d] for d in tests) / max(sum(n.values()), 1))
    if protocol.open_set:  # pooled over every held-out image, i.e. sample-weighted like test_acc
        entry["open_set"] = open_set_metrics(torch.cat(list(all_logits.values())),
                                             torch.cat([s.labels for s in test.values()]), C, threshold)
    if oracle:
        entry["oracle_acc"] = float(np.mean([closed_set_accuracy(_logits(method, s, cfg.eval_batch_size, device, cfg.seed),
                                                                 s.labels, C) for s in oracle.values()]))
    return entry


# ---- method placement, batches and data-parallel training (the engine's part of the method contract)
class _PooledBatches:
    """Per step: `batch_size` indices drawn with replacement from ALL source items (Dassl's
    loader over the pooled sources, as CoOp / CoCoOp / GOPro train), from a seeded generator."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if int(batch_size) < 1 or n < 1:
            raise ValueError(f"need batch_size >= 1 and training items; got {batch_size} and {n}")
        self.n, self.batch_size, self.generator = int(n), int(batch_size), generator

    def draw(self) -> torch.Tensor:
        return torch.randint(self.n, (self.batch_size,), generator=self.generator)


def _batch_sampler(hparams: dict, domains: torch.Tensor, generator: torch.Generator):
    bs = int(hparams.get("batch_size", 32))
    scope = hparams.get("batch_scope", "per_domain")
    if scope == "per_domain":  # DomainBed, DPL: batch_size from EACH source domain
        return DomainBalancedBatches(domains, bs, generator)
    if scope == "total":
        return _PooledBatches(len(domains), bs, generator)
    raise ValueError(f"batch_scope must be 'per_domain' or 'total', got {scope!r}")


def _run_sources(method_cls, hparams: dict, embedded: bool) -> dict:
    """name -> source of each value this run used (a value other than the default was set for the
    run: --hparams or a random-search draw)."""
    table = method_cls.sourced_defaults(embedded=embedded)
    out = _provenance_sources(table)
    for k, v in hparams.items():
        if k not in table or table[k].value != v:
            out[k] = "project: set for this run (--hparams or a random-search draw)"
    return out


def _training_forward(method, device):
    """What a step calls: the method itself, or DistributedDataParallel around it under torchrun
    (gradients averaged across ranks during the backward)."""
    _, world = _rank_world()
    if world == 1:
        return method
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # some parameters sit out some steps (two-stage schedules, unused options)
    return DistributedDataParallel(method, device_ids=ids, find_unused_parameters=True)


def run_training(cfg: TrainConfig) -> dict:
    """Train and evaluate one run; returns (and on rank 0 appends) its results record."""
    if cfg.selection not in ("training-domain", "oracle"):
        raise ValueError(f"selection must be 'training-domain' or 'oracle', got {cfg.selection!r}")
    rank, world = _rank_world()
    out_dir = Path(cfg.output_dir)
    results_path = out_dir / "results.jsonl"
    key = run_key(cfg)
    method_cls = get_method(cfg.method)  # clear error for unknown methods before any work
    spec = get_spec(cfg.dataset)
    hparams = {**method_cls.hparams_for(cfg.hparams_seed, embedded=spec.embedded), **cfg.hparams}
    if spec.embedded:
        ensure_rotated_digits(cfg.root)
    records = scan(cfg.root, spec)
    # --- data checked before any work (dgclip.run_guard): the domains this run reads ---
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    read_domains = [d for d in spec.domains if d in set(cfg.test_domains) | set(cfg.train_domains or spec.domains)]
    records, data = checked_records(spec, records, read_domains, cache_dir=cache_dir,
                                    skip_unreadable=cfg.skip_unreadable)
    if cfg.resume:
        done = [r for r in read_records(results_path) if r.get("run_key") == key]
        if done:
            _check_resumable(done[-1], hparams, cfg, f"finished run {key} in {results_path}", data)
            return done[-1]
    # --- end of the data check ---
    protocol = make_protocol(spec, records, list(cfg.test_domains), trial_seed=cfg.seed,
                             holdout_fraction=cfg.holdout_fraction, train_domains=cfg.train_domains,
                             oracle=cfg.selection == "oracle" or cfg.track_oracle)
    device = torch.device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.pretrained, cache_dir=cache_dir, device=device,
                             precision=cfg.precision)
    classnames = [spec.classname(c) for c in protocol.classnames]
    torch.manual_seed(seed_hash(cfg.seed, "init"))
    method = method_cls(backbone, classnames, len(protocol.source_domains), hparams)
    if hasattr(method, "set_domain_names"):  # e.g. SeeCLIP's diffusion prompt names the source domain
        method.set_domain_names([d.replace("_", " ") for d in protocol.source_domains])
    method.to(device)
    method.configure_optimizers(cfg.steps)

    eval_tf = backbone.preprocess_val
    train_tf = method.make_train_transform(eval_tf)
    cached = cfg.feature_cache and method.uses_frozen_features and train_tf is eval_tf
    plan = CachePlan("off", reason="feature cache disabled" if not cfg.feature_cache else
                     "the method needs augmented or trainable image features")
    if cached:
        n_items = len(protocol.train) + sum(len(r) for part in (protocol.val, protocol.test, protocol.oracle_val)
                                            for r in part.values())
        probe = ImageDataset(protocol.train, eval_tf, label_map=protocol.label_map, domain_map=protocol.domain_map)
        plan = plan_cache(backbone, probe, n_items, patches=method.needs_patches,
                          layer_stats=method.needs_layer_stats, budget_gb=cfg.feature_cache_budget_gb)
        cached = plan.cached
    cache_keys = {}
    workers = default_workers() if cfg.workers is None else int(cfg.workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    pin = device.type == "cuda"

    def split(recs, tf, name):
        host_tf, device_stage = split_device_stage(tf)  # uint8 images through the loader
        ds = ImageDataset(recs, host_tf, label_map=protocol.label_map, domain_map=protocol.domain_map)
        feats = None
        if cached:
            wid = str(getattr(backbone, "weights_id", ""))
            fkey = feature_cache_key(backbone, spec.name, recs.paths, tf, patches=method.needs_patches,
                                     layer_stats=method.needs_layer_stats, weights_id=wid)
            cache_keys[name] = cache_keys.get(name, []) + [fkey]
            feats = compute_features(backbone, ds, patches=method.needs_patches,
                                     layer_stats=method.needs_layer_stats,
                                     cache_dir=cache_dir / "features", key=fkey, workers=workers, pin=pin,
                                     device_stage=device_stage)
        return _Split(ds, feats, workers, pin, device_stage, stage_in_loader(device))

    train = split(protocol.train, train_tf, "train")
    val = {d: split(r, eval_tf, "val") for d, r in protocol.val.items()}
    test = {d: split(r, eval_tf, "test") for d, r in protocol.test.items()}
    oracle = {d: split(r, eval_tf, "oracle") for d, r in protocol.oracle_val.items()}

    gen = torch.Generator().manual_seed(seed_hash(cfg.seed, "batches"))
    ckpt_path = out_dir / "checkpoints" / f"{key}.pt"
    start, history, losses = 0, [], []
    torch.manual_seed(seed_hash(cfg.seed, "train"))  # dropout etc.; feature extraction may draw RNG
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resumable(state, hparams, cfg, f"checkpoint {ckpt_path}", data)
        method.load_checkpoint_state(state["method_state"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, history, losses = state["step"], state["history"], state["losses"]

    trainable = bool(method.trainable_parameters()) and method.optimizer is not None
    steps = cfg.steps if trainable else 0
    sampler = _batch_sampler(hparams, train.domains, gen) if steps else None
    forward = _training_forward(method, device) if steps else None
    step_sampler, batches = None, None
    if steps and train.feats is None:  # images: decoded and augmented in the loader's workers
        step_sampler = StepSampler(lambda _gen: sampler.draw()[rank::world], gen, start, steps)
        batches = iter(train_loader(train.ds, cfg.seed, step_sampler, workers=workers, pin=pin,
                                    device_stage=train.loader_stage))
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"{cfg.method} {'+'.join(cfg.test_domains)} s{cfg.seed}",
               disable=not cfg.progress or rank != 0, leave=False)
    t0 = time.time()
    pending = []  # this interval's losses, still on the device: one host sync per evaluation

    def save_checkpoint(done_steps: int) -> None:
        nonlocal pending
        if pending:  # the losses of a step the checkpoint covers are part of it
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending = []
        if rank == 0:
            _atomic_save({"step": done_steps, "method_state": method.checkpoint_state(),
                          "generator": step_sampler.state_after(done_steps - 1) if step_sampler else gen.get_state(),
                          "torch_rng": torch.get_rng_state(),
                          "history": history, "losses": losses, "config": asdict(cfg),
                          "hparams": hparams, "data": data, "classnames": classnames,
                          "source_domains": protocol.source_domains}, ckpt_path)

    method.train()
    with InterruptGuard() as guard:  # SIGINT/SIGTERM: checkpoint at the step just finished, then stop
        for step in range(start, steps):
            try:
                batch = Batch(*next(batches), device_stage=train.batch_stage) if batches is not None \
                    else train.batch(sampler.draw()[rank::world])
            except Exception:
                if guard.signum is None:
                    raise
                # a terminal's Ctrl-C also reaches the loader's workers, which then quit: keep the
                # steps finished so far
                if step > start:
                    save_checkpoint(step)
                batches = None
                raise RunInterrupted(guard.signum, step, str(ckpt_path) if step > start or ckpt_path.exists() else None) from None
            out = method.update(batch.to(device), forward)
            pending.append(out["loss"])
            bar.update(1)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
                losses += torch.stack(pending).float().cpu().tolist()
                bar.set_postfix({k: f"{float(v):.3f}" for k, v in out.items()})
                pending = []
                entry = _evaluate(method, val, test, oracle, protocol, cfg, device)
                method.train()
                entry["step"] = step + 1
                entry["loss"] = float(np.mean(losses[-cfg.eval_every:])) if losses else None
                history.append(entry)
                save_checkpoint(step + 1)
            elif guard.signum is not None:
                save_checkpoint(step + 1)
            if guard.signum is not None:
                bar.close()
                batches = None
                raise RunInterrupted(guard.signum, step + 1, str(ckpt_path))
        stopped = guard.signum
    bar.close()
    if stopped is not None:  # asked to stop during a run without steps (nothing to save)
        raise RunInterrupted(stopped, None, None)
    batches = None  # ends the training loader's workers
    if not history:  # nothing trainable (zero-shot): one evaluation
        entry = _evaluate(method, val, test, oracle, protocol, cfg, device)
        entry["step"] = 0
        history.append(entry)
    chosen = select_in_run(history, cfg.selection)
    record = {
        "run_key": key, "method": cfg.method, "dataset": spec.name, "test_domain": "+".join(cfg.test_domains),
        "seed": cfg.seed, "hparams_seed": cfg.hparams_seed,
        "selection": "oracle (target-domain validation, last step)" if cfg.selection == "oracle"
        else "training-domain validation",
        "test_acc": chosen["test_acc"], "val_acc": chosen["val_acc"], "selected_step": chosen["step"],
        "transductive": bool(method.transductive),
        "feature_cache": {**plan.describe(), "keys": cache_keys}, "workers": workers,
        "image_normalisation": ("in the per-image transform" if train.device_stage is None
                                else "in the loader, per batch" if stage_in_loader(device)
                                else f"on {device.type}, per batch"),  # dgclip.data.transfer
        "eval_batch_size": eval_batch_size(method, cfg.eval_batch_size),
        "hparams": hparams,
        "hparam_sources": _run_sources(method_cls, hparams, spec.embedded),
        "method_notes": method.run_notes() if hasattr(method, "run_notes") else {},
        "config": asdict(cfg), "protocol": protocol.describe(), "versions": _versions(),
        "data": data, "classnames": classnames,
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained}, "world_size": world,
        "train_seconds": round(time.time() - t0, 2), "history": history,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
    }
    if protocol.open_set:
        record.update(chosen["open_set"])
    if rank == 0:
        append_record(results_path, record)
    return record
