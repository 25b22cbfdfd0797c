"""GOPro (BMVC 2023): style/content-conditioned prompts learned from three views of each image.

Per image, the frozen image tower's per-layer token mean/std give style and content vectors
(`StyleContentShift`), mixed over layers into one shift added to the M = 4 shared context vectors
("a photo of a" initialisation): B x K prompts per view. Three views per image (original, MoCo-v3
style, AugMix; built in the data loader by `make_train_transform`) all go through the same prompt
generator, so one step encodes 3 x B x K prompt sequences through `dgkernels.PromptEncoder`
(prefix sharing, chunking).

Loss = CE(original view) + consistency_weight * [MSE(T_o, T_moco) + MSE(T_o, T_augmix)]
       + contrastive_weight * NT-Xent(tau) on normalised P_v(f_o), P_v(f_moco)
with T_v the L2-normalised text features of view v ([B, K, E]) and P_v = Linear(E, E) + BatchNorm1d.

Options (INFERRED or disputed; defaults as the paper):
  projector_feeds_logits (True): the paper's figure puts P_v before the logits; the released code
    classifies the raw image feature (set False for that reading).
  consistency_on_normalized (True): the MSE compares L2-normalised text features.
  projector_init ("zero_residual"): P_v acts as f + BN(Linear(f)) with the BatchNorm scale at 0,
    so it starts as the identity on CLIP's space and GOPro's defaults start from zero-shot CLIP
    (a randomly initialised P_v in the logits starts from a random image embedding and fell to
    chance: 16.9% held-out vs zero-shot 59.5% on the embedded default). "random": the plain
    Linear + BatchNorm with PyTorch's init (the released code, where P_v does not feed the logits).
  augmix_ops ("tpt"): AugMix over TPT's op list (geometric and histogram ops, no colour ops),
    applied after the original view's crop/flip; "torchvision": torchvision's AugMix list.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dgkernels

from . import register_method
from ..backbone import ImageFeatures
from .base import Batch, Method, check_choice, cosine_logits
from .prompt_modules import StyleContentShift, initial_context, make_prompt_encoder
from .training import cosine_with_constant_warmup, make_optimizer
from .views import MultiViewTransform

VIEWS = ("original", "moco", "augmix")


@register_method("gopro")
class GOPro(Method):
    open_set = False
    uses_frozen_features = False  # three augmented views per step
    needs_layer_stats = True
    default_hparams = {
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "optimizer": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 4,
        "warmup_fraction": 0.02,  # 1 of 50 epochs, at the constant warm-up lr
        "warmup_lr": 1e-5,
        "consistency_weight": 1.0,
        "contrastive_weight": 0.1,
        "temperature": 0.1,
        "projector_feeds_logits": True,
        "consistency_on_normalized": True,
        "moco_blur_p": 1.0,
        "prompt_chunk_size": 0,  # 0 = the encoder's default
        # INFERRED (not published): "zero" starts the Linear(L->1) layer mix at zero so the first
        # prompts are the "a photo of a" context; "default" = nn.Linear's init as in the released code.
        "shift_init": "zero",
        "projector_init": "zero_residual",  # | "random"
        "augmix_ops": "tpt",  # | "torchvision"
        "crop_scale_min": 0.08,  # random-resized-crop scale (0.08, 1) of the original and MoCo views
        "hflip": True,  # off for data whose meaning mirroring changes (digits)
    }

    lr_log10_range = (-3.5, -2.0)
    weight_decay_log10_range = (-5.0, -3.0)
    batch_sizes = (4, 8, 16, 32)

    # embedded default (32 px digits, 200 steps): mirroring changes a digit and a random crop of a
    # 32 px digit cuts strokes, so both are off; the paper's lr 0.002 is for 50 epochs, far too
    # little for 200 steps. lr and batch picked by source validation (never the target); the
    # candidates and their scores: benchmarks/results/embedded_default.md.
    embedded_hparams = {"hflip": False, "crop_scale_min": 1.0, "lr": 0.1, "batch_size": 8}

    @classmethod
    def search_space(cls, rng) -> dict:
        hp = super().search_space(rng)
        hp.update({
            "consistency_weight": float(10 ** rng("consistency_weight").uniform(-1, 1)),
            "contrastive_weight": float(10 ** rng("contrastive_weight").uniform(-2, 0)),
            "temperature": float(rng("temperature").choice([0.05, 0.1, 0.2])),
        })
        return hp

    def __init__(self, backbone, classnames, num_domains, hparams=None):
        super().__init__(backbone, classnames, num_domains, hparams or {})
        hp = self.hparams
        check_choice(hp, "projector_init", ("zero_residual", "random"))
        check_choice(hp, "augmix_ops", ("tpt", "torchvision"))
        self.n_ctx = int(hp["n_ctx"])
        chunk = int(hp["prompt_chunk_size"]) or None
        self.encoder = make_prompt_encoder(backbone, self.classnames, chunk_size=chunk)
        self.ctx = nn.Parameter(initial_context(self.encoder, self.n_ctx, hp["ctx_init"] or None))
        self.shift = StyleContentShift(backbone.num_layers, backbone.vision_width, backbone.text_width,
                                       zero_init=hp["shift_init"] == "zero")
        dim = backbone.embed_dim
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim))
        self.residual_projector = hp["projector_init"] == "zero_residual"
        if self.residual_projector:
            nn.init.zeros_(self.projector[1].weight)  # P_v(f) = f + 0 at start: the identity
        self.to(backbone.device)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """P_v: Linear + BatchNorm, as a residual on f when projector_init='zero_residual'."""
        out = self.projector(f)
        return f.to(out.dtype) + out if self.residual_projector else out

    def configure_optimizers(self, total_steps: int):
        """SGD, CoOp's constant warm-up lr for warmup_fraction of the run, then cosine to 0."""
        hp = self.hparams
        self.optimizer = make_optimizer(hp["optimizer"], self.trainable_parameters(), lr=hp["lr"],
                                        weight_decay=hp["weight_decay"], momentum=hp["momentum"])
        self.scheduler = cosine_with_constant_warmup(self.optimizer, total_steps=int(total_steps),
                                                     warmup_steps=int(round(hp["warmup_fraction"] * total_steps)),
                                                     warmup_lr=hp["warmup_lr"])
        return self.optimizer

    def make_train_transform(self, base_transform):
        hp = self.hparams
        return MultiViewTransform(base_transform, blur_p=float(hp["moco_blur_p"]),
                                  crop_scale=(float(hp["crop_scale_min"]), 1.0), hflip=bool(hp["hflip"]),
                                  augmix_ops=hp["augmix_ops"])

    # -- forward pieces -------------------------------------------------------------------------
    def text_features(self, feats) -> torch.Tensor:
        """[N, K, E] text features, one prompt set per image (N = rows of feats), one encoder call."""
        ctx = self.ctx[None] + self.shift(feats.layer_mean, feats.layer_std)[:, None, :]  # [N, M, W]
        return self.encoder(ctx).float()

    def losses(self, views: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [v for v in VIEWS if v not in views]
        if missing:
            raise ValueError(f"GOPro needs the views {VIEWS} in batch.images (built by make_train_transform); missing {missing}")
        return self.losses_from_features(self.features(torch.cat([views[v] for v in VIEWS])), labels)

    def losses_from_features(self, feats: ImageFeatures, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """feats: frozen features of the 3B views stacked as [original; moco; augmix]."""
        b = labels.shape[0]
        if feats.pooled.shape[0] != 3 * b:
            raise ValueError(f"expected features of 3 x {b} views, got {feats.pooled.shape[0]} rows")
        text = self.text_features(feats).view(3, b, self.num_classes, -1)  # 3 x B x K prompts in one call
        pooled = feats.pooled.view(3, b, -1)
        proj_o, proj_m = self.project(pooled[0]), self.project(pooled[1])  # BatchNorm statistics per view
        image_o = proj_o if self.hparams["projector_feeds_logits"] else pooled[0]
        ce = dgkernels.cosine_cross_entropy(image_o, text[0], self.backbone.logit_scale, labels)
        t = F.normalize(text, dim=-1) if self.hparams["consistency_on_normalized"] else text
        consistency = F.mse_loss(t[0], t[1]) + F.mse_loss(t[0], t[2])
        nce = dgkernels.multiview_info_nce(torch.stack([proj_o, proj_m], dim=1), temperature=self.hparams["temperature"])
        total = ce + self.hparams["consistency_weight"] * consistency + self.hparams["contrastive_weight"] * nce
        return {"loss": total, "ce": ce, "consistency": consistency, "contrastive": nce}

    def update(self, batch: Batch) -> dict[str, float]:
        if not isinstance(batch.images, dict):
            raise ValueError("GOPro trains on a dict of views in batch.images; build the loader with make_train_transform")
        self.train()
        batch = batch.to(self.backbone.device)
        out = self.losses(batch.images, batch.labels)
        self.step(out["loss"])
        return {k: float(v.detach()) for k, v in out.items()}

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """[B, K] logits from images (a tensor, or a dict of views: the original is used) or cached features."""
        was = self.training
        self.eval()  # BatchNorm running statistics: a prediction never depends on the rest of the batch
        try:
            if isinstance(x, dict):
                x = x["original"]
            feats = self.features(x if isinstance(x, ImageFeatures) else x.to(self.backbone.device))
            image = self.project(feats.pooled) if self.hparams["projector_feeds_logits"] else feats.pooled
            return cosine_logits(image, self.text_features(feats), self.backbone.logit_scale)
        finally:
            self.train(was)
