"""The method interface every dgclip method implements.

A method owns its trainable modules and its optimiser; the engine hands it `Batch`es through
`update` (one optimisation step, returns the losses as floats) and asks `predict` for logits.
The frozen backbone is held as a plain attribute, not a submodule, so method state dicts and
checkpoints carry only what the method learns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..backbone import CLIPBackbone, ImageFeatures
from ..data.splits import seed_hash
from ..data.transfer import finish_images

__all__ = ["Batch", "Method", "cosine_logits", "check_choice", "HparamRNG"]

Images = Union[torch.Tensor, dict]


@dataclass
class Batch:
    """One training batch.

    images:   [B, 3, H, W], or a dict of views (key "original" always present); may be None when
              cached `features` are given.
    labels:   [B] long class indices.
    domains:  [B] long source-domain indices in 0..S-1.
    features: cached frozen `ImageFeatures` of the original view (engine feature cache), or None.
    device_stage: what the images still need once on their device (the loader ships uint8 images;
              `dgclip.data.transfer`): applied by `to`, which every batch goes through before a
              method sees it; the images cannot be read before that.
    """

    images: Optional[Images]
    labels: torch.Tensor
    domains: torch.Tensor
    features: Optional[ImageFeatures] = None
    device_stage: Optional[Callable] = None

    def _images(self) -> Optional[Images]:
        if self.device_stage is not None:
            raise RuntimeError("batch images still need their device stage (raw pixels from the loader, "
                               "dgclip.data.transfer): call batch.to(device) first")
        return self.images

    def original(self) -> torch.Tensor:
        imgs = self._images()
        return imgs["original"] if isinstance(imgs, dict) else imgs

    def view(self, key: str) -> torch.Tensor:
        imgs = self._images()
        if not isinstance(imgs, dict):
            raise KeyError(f"batch has a single view; asked for {key!r}")
        return imgs[key]

    def to(self, device) -> "Batch":
        imgs = self.images
        if isinstance(imgs, dict):
            imgs = {k: v.to(device, non_blocking=True) for k, v in imgs.items()}
        elif imgs is not None:
            imgs = imgs.to(device, non_blocking=True)
        return replace(self, images=finish_images(imgs, self.device_stage), device_stage=None,
                       labels=self.labels.to(device), domains=self.domains.to(device),
                       features=self.features.to(device) if self.features is not None else None)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


TRAIN_AUGMENTS = ("none", "crop", "crop_flip")


class HparamRNG:
    """DomainBed's per-name seeding: rng(name) is a fresh generator seeded by (seed, name)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.names: set[str] = set()  # every name drawn (the searched hyper-parameters)

    def __call__(self, name: str) -> np.random.Generator:
        self.names.add(name)
        return np.random.default_rng(seed_hash(self.seed, name))


def check_choice(hparams: dict, key: str, allowed: tuple) -> str:
    """The one check of an enum-valued hyper-parameter: a clear error naming the choices."""
    value = hparams[key]
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    return value


def cosine_logits(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(image, text) for image [B, E] and text [K, E] (shared) or [B, K, E] (per image)."""
    image = nn.functional.normalize(image.float(), dim=-1)
    text = nn.functional.normalize(text.float(), dim=-1)
    if text.dim() == 2:
        return scale * image @ text.t()
    return scale * torch.einsum("be,bke->bk", image, text)


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement `update` and `predict`.

    Class attributes:
      name                 registry name (set by @register_method)
      open_set             True if `predict` returns [B, K+1] logits, last column = unknown
      default_hparams      defaults from the paper (DomainBed convention: trial seed 0 uses these)
      uses_frozen_features True if the method only needs frozen features of the un-augmented
                           original view, so the engine may cache them on disk
      needs_patches / needs_layer_stats: which optional ImageFeatures fields the method reads
      eval_batch_size      the paper's evaluation batch size; only used when `transductive`
      hparam_sources       name -> source of each default (dgclip.provenance forms)
      embedded_hparams     overrides on the embedded default, each with its reason in
                           embedded_sources: data facts only (no tuned value)
    """

    name: str = "base"
    open_set: bool = False
    default_hparams: dict = {"lr": 2e-3, "batch_size": 32, "batch_scope": "per_domain", "optimizer": "sgd",
                             "momentum": 0.9, "weight_decay": 5e-4, "warmup_fraction": 0.0, "warmup_lr": 1e-5}
    # name -> where the default comes from ("paper: ...", "released: repo/path:Lnn", "project: why");
    # merged along the class hierarchy like default_hparams; every default must have one
    hparam_sources: dict = {
        "lr": "project: base-class placeholder, every trainable method sets its own",
        "batch_size": "released: facebookresearch/DomainBed domainbed/hparams_registry.py:L210-233 (batch 32)",
        "batch_scope": "released: facebookresearch/DomainBed domainbed/scripts/train.py:L146-152 "
                       "(batch_size images from EACH training env per step)",
        "optimizer": "project: base-class placeholder, every trainable method sets its own",
        "momentum": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L151-156 (SGD momentum 0.9)",
        "weight_decay": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L151-156 (5e-4)",
        "warmup_fraction": "project: no warm-up unless the method's released config has one",
        "warmup_lr": "released: KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ep50.yaml (WARMUP_CONS_LR 1e-5)",
    }
    uses_frozen_features: bool = False
    needs_patches: bool = False
    needs_layer_stats: bool = False
    eval_batch_size: int = 64  # DomainBed's evaluation loaders
    # Overrides of default_hparams on the embedded default (32 px rotated digits): only settings
    # that follow from what the data IS (mirroring changes a digit), never a tuned number.
    embedded_hparams: dict = {}
    embedded_sources: dict = {}

    @property
    def transductive(self) -> bool:
        """True when `predict` pools over the test batch (its output depends on the batch)."""
        return False

    def __init__(self, backbone: CLIPBackbone, classnames: list[str], num_domains: int, hparams: dict):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: frozen, never saved
        self.classnames = list(classnames)
        self.num_classes = len(self.classnames)
        self.num_domains = int(num_domains)
        unknown = set(hparams) - set(self.all_defaults())
        if unknown:
            raise ValueError(f"unknown hyper-parameters for {self.name}: {sorted(unknown)}; "
                             f"known: {sorted(self.all_defaults())}")
        self.hparams = {**self.all_defaults(), **hparams}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None

    # ----- hyper-parameters -------------------------------------------------------------------
    @classmethod
    def all_defaults(cls) -> dict:
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, "default_hparams", {}) or {})
        return merged

    @classmethod
    def all_sources(cls) -> dict:
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, "hparam_sources", {}) or {})
        return merged

    @classmethod
    def sourced_defaults(cls, embedded: bool = False) -> dict:
        """name -> provenance.Sourced(value, source) for every default (embedded overrides on top)."""
        from ..provenance import Sourced

        sources = cls.all_sources()
        missing = sorted(set(cls.all_defaults()) - set(sources))
        if missing:
            raise ValueError(f"{cls.name}: hyper-parameters without a source: {missing}")
        out = {k: Sourced(v, sources[k]) for k, v in cls.all_defaults().items()}
        if embedded:
            for k, v in cls.embedded_hparams.items():
                out[k] = Sourced(v, cls.embedded_sources[k])
        return out

    # The random search (one rule for every method, so no method gets a wider net): lr
    # log-uniform over [default / 10, default * 10], batch size from `batch_sizes`, weight decay
    # log-uniform over `weight_decay_log10_range` (1e-6..1e-3; GOPro 1e-5..1e-3) when the default is
    # not 0; subclasses add their own names.
    lr_log10_halfwidth: float = 1.0
    weight_decay_log10_range: tuple = (-6.0, -3.0)
    batch_sizes: tuple = (16, 32, 64)

    @classmethod
    def search_space(cls, rng: "HparamRNG") -> dict:
        """A random draw of hyper-parameters (DomainBed style): lr, batch_size and weight_decay
        here, once for every method; subclasses add their own names. `rng(name)` is a generator
        seeded by (hparams_seed, name) only, so adding an option never changes another draw."""
        hp = cls.all_defaults()
        if "lr" in hp:
            centre = math.log10(hp["lr"])
            lo, hi = centre - cls.lr_log10_halfwidth, centre + cls.lr_log10_halfwidth
            hp["lr"] = float(10 ** rng("lr").uniform(lo, hi))
        if "batch_size" in hp:
            hp["batch_size"] = int(rng("batch_size").choice(cls.batch_sizes))
        if hp.get("weight_decay", 0) > 0:  # a paper's 0 stays 0
            hp["weight_decay"] = float(10 ** rng("weight_decay").uniform(*cls.weight_decay_log10_range))
        return hp

    @classmethod
    def defaults_for(cls, embedded: bool = False) -> dict:
        """The defaults, with `embedded_hparams` on top for the embedded default dataset."""
        hp = cls.all_defaults()
        if embedded:
            hp.update(cls.embedded_hparams)
        return hp

    @classmethod
    def hparams_for(cls, hparams_seed: int = 0, embedded: bool = False) -> dict:
        """Trial hyper-parameters: seed 0 = defaults, others = a seeded random-search draw (the
        searched names drawn, every other name at its default)."""
        if hparams_seed == 0:
            return cls.defaults_for(embedded)
        rng = HparamRNG(hparams_seed)
        draw = cls.search_space(rng)
        return {**cls.defaults_for(embedded), **{k: draw[k] for k in rng.names if k in draw}}

    # ----- data hooks --------------------------------------------------------------------------
    def make_train_transform(self, base_transform):
        """Return the training transform (may return a dict of views).

        Methods with a `train_augment` option: "none" (the eval transform, so the engine may cache
        frozen features), "crop" (random resized crop, scale 0.08-1, at the image's own size),
        "crop_flip" (+ horizontal flip: CoOp's / DPL's recipe for natural images), each followed by
        the base transform.
        """
        kind = check_choice(self.hparams, "train_augment", TRAIN_AUGMENTS) if "train_augment" in self.hparams \
            else "none"
        if kind == "none":
            return base_transform
        from torchvision import transforms as T

        from .views import original_view

        return T.Compose([original_view((0.08, 1.0), hflip=kind == "crop_flip"), base_transform])

    def features(self, x) -> ImageFeatures:
        """ImageFeatures for raw images (one frozen forward) or pass-through for cached ones."""
        if isinstance(x, ImageFeatures):
            if not x.has(patches=self.needs_patches, layer_stats=self.needs_layer_stats):
                raise ValueError(f"{self.name} needs patches={self.needs_patches}, "
                                 f"layer_stats={self.needs_layer_stats} in its cached features")
            return x
        return self.backbone.image_features(x, patches=self.needs_patches,
                                            layer_stats=self.needs_layer_stats)

    def batch_features(self, batch: Batch) -> ImageFeatures:
        return batch.features if batch.features is not None else self.features(batch.original())

    # ----- optimisation ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self, total_steps: int):
        """self.optimizer / self.scheduler from hparams: the one factory (methods/training.py) of
        every method: SGD or AdamW, CoOp's constant warm-up lr for `warmup_fraction` of the steps,
        then cosine to 0."""
        from .training import cosine_with_constant_warmup, make_optimizer

        hp = self.hparams
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            self.optimizer, self.scheduler = None, None
            return None
        total = max(int(total_steps), 1)
        self.optimizer = make_optimizer(hp.get("optimizer", "sgd"), groups, lr=hp["lr"],
                                        weight_decay=hp.get("weight_decay", 0.0), momentum=hp.get("momentum", 0.9))
        self.scheduler = cosine_with_constant_warmup(
            self.optimizer, total_steps=total, warmup_steps=int(round(float(hp.get("warmup_fraction", 0.0)) * total)),
            warmup_lr=float(hp.get("warmup_lr", 1e-5)))
        return self.optimizer

    def step(self, loss: torch.Tensor) -> None:
        """Backward + optimiser and scheduler step (DDP, when the engine wraps the method, averages
        the gradients during the backward)."""
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: configure_optimizers() was not called")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun the engine wraps the method in DDP: gradients averaged here
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    # ----- API -------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's losses as tensors on the device ("loss" = the total that is minimised)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        # the training forward: DistributedDataParallel(method)(batch) runs this, so DDP's
        # gradient hooks see the forward that produced the loss
        return self.training_losses(batch)

    def update(self, batch: Batch, forward: Optional[Callable] = None) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch already on the method's device. `forward` is the
        engine's DDP wrapper under torchrun (default: this method). Returns the detached losses,
        still on the device: the caller decides when to pay for a host sync."""
        out = (forward or self)(batch)
        self.step(out["loss"])
        return {k: v.detach() for k, v in out.items()}

    def predict(self, x) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.model.eval()  # a text tower held by a submodule must stay in eval mode
        return self

    # ----- checkpoints -------------------------------------------------------------------------
    def _frozen_ptrs(self) -> set[int]:
        m = self.backbone.model
        return {t.data_ptr() for t in list(m.parameters()) + list(m.buffers())}

    def method_state_dict(self) -> dict:
        """state_dict without any tensor that belongs to the frozen backbone."""
        frozen = self._frozen_ptrs()
        return {k: v for k, v in self.state_dict().items() if v.data_ptr() not in frozen}

    def checkpoint_state(self) -> dict:
        return {"method": self.method_state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_checkpoint_state(self, state: dict) -> None:
        own = self.method_state_dict()
        missing = set(own) - set(state["method"])
        unexpected = set(state["method"]) - set(own)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match {self.name}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict(state["method"], strict=False)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
