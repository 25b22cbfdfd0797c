"""CoOp (Zhou et al., IJCV 2022): learnable context vectors before the class name.

M = 16 context vectors, shared by all classes or class-specific; CE on logit_scale * cos.
Paper: SGD lr 0.002, cosine schedule, batch 32, random N(0, 0.02) init (or "a photo of a").
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import dgkernels

from ..prompting import ClassPromptEncoder, init_context
from . import register_method
from .base import Batch, Method, cosine_logits


@register_method("coop")
class CoOp(Method):
    open_set = False
    uses_frozen_features = True
    default_hparams = {"lr": 2e-3, "batch_size": 32, "optimizer": "sgd", "momentum": 0.9,
                       "weight_decay": 5e-4, "warmup_steps": 0, "train_augment": "none", "n_ctx": 16, "class_specific": False,
                       "ctx_init": ""}

    def __init__(self, backbone, classnames, num_domains, hparams):
        super().__init__(backbone, classnames, num_domains, hparams)
        n_ctx = int(self.hparams["n_ctx"])
        self.prompt_encoder = ClassPromptEncoder(backbone, self.classnames, n_ctx)
        ctx = init_context(backbone, n_ctx, self.hparams["ctx_init"] or None)
        if self.hparams["class_specific"]:
            ctx = ctx.unsqueeze(0).repeat(self.num_classes, 1, 1)
        self.ctx = nn.Parameter(ctx.to(backbone.device))

    @classmethod
    def search_space(cls, rng) -> dict:
        hp = super().search_space(rng)
        hp["n_ctx"] = int(rng("n_ctx").choice([4, 8, 16]))
        hp["class_specific"] = bool(rng("class_specific").integers(2))
        return hp

    def text_features(self) -> torch.Tensor:
        return self.prompt_encoder(self.ctx, class_specific=self.hparams["class_specific"])[0]

    def logits(self, x) -> torch.Tensor:
        return cosine_logits(self.features(x).pooled, self.text_features(), self.backbone.logit_scale)

    def update(self, batch: Batch) -> dict:
        f = self.batch_features(batch).pooled
        # fused cosine CE: no [B, K] logits kept for the backward
        loss = dgkernels.cosine_cross_entropy(f, self.text_features(), self.backbone.logit_scale, batch.labels)
        self.step(loss)
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        return self.logits(x)
