"""CoCoOp (Zhou et al., CVPR 2022): context shifted per image by a meta-net.

M = 4 context vectors initialised from "a photo of a"; meta-net Linear(E, E/16) -> ReLU ->
Linear(E/16, W) maps each L2-normalised image feature to a shift added to every context vector, giving
B x K prompts per step, all encoded in one batched call. Defaults = the released config
(vit_b16_c4_ep10_batch1_ctxv1): ONE image per step in total, SGD lr 0.002, one of 10 epochs at a
constant 1e-5, Dassl's random resized crop (0.08, 1) + flip, bicubic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dgkernels

from ..prompting import ClassPromptEncoder, init_context
from . import register_method
from .base import Batch, Method, cosine_logits
from .coop import DASSL_AUGMENT_SOURCE, DIGITS_NO_FLIP

COCOOP_CFG = "released: KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml:L1-35"


@register_method("cocoop")
class CoCoOp(Method):
    open_set = False
    uses_frozen_features = True  # only when train_augment = "none"
    default_hparams = {"lr": 2e-3, "batch_size": 1, "batch_scope": "total", "optimizer": "sgd", "momentum": 0.9,
                       "weight_decay": 5e-4, "warmup_fraction": 0.1, "warmup_lr": 1e-5, "train_augment": "crop_flip",
                       "n_ctx": 4, "ctx_init": "a photo of a", "meta_reduction": 16}
    hparam_sources = {
        "lr": f"{COCOOP_CFG} (OPTIM.LR 0.002)",
        "batch_size": f"{COCOOP_CFG} (DATALOADER.TRAIN_X.BATCH_SIZE 1)",
        "batch_scope": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L102 (RandomSampler over the "
                       "pooled training set)",
        "optimizer": "released: KaiyangZhou/Dassl.pytorch dassl/optim/optimizer.py:L105-113 (SGD)",
        "momentum": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L151-156",
        "weight_decay": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L151-156",
        "warmup_fraction": f"{COCOOP_CFG} (WARMUP_EPOCH 1 of MAX_EPOCH 10)",
        "warmup_lr": f"{COCOOP_CFG} (WARMUP_TYPE constant, WARMUP_CONS_LR 1e-5)",
        "train_augment": DASSL_AUGMENT_SOURCE,
        "n_ctx": f"{COCOOP_CFG} (N_CTX 4)",
        "ctx_init": f"{COCOOP_CFG} (CTX_INIT 'a photo of a')",
        "meta_reduction": "released: KaiyangZhou/CoOp trainers/cocoop.py:L95-98 (Linear(d, d // 16))",
    }
    embedded_hparams = {"train_augment": "crop"}
    embedded_sources = {"train_augment": DIGITS_NO_FLIP}
    batch_sizes = (1, 2, 4)

    def __init__(self, backbone, classnames, num_domains, hparams):
        super().__init__(backbone, classnames, num_domains, hparams)
        n_ctx = int(self.hparams["n_ctx"])
        init = self.hparams["ctx_init"] or None
        if init is not None and n_ctx != 4:
            init = None  # the init phrase has 4 tokens
        self.prompt_encoder = ClassPromptEncoder(backbone, self.classnames, n_ctx)
        self.ctx = nn.Parameter(init_context(backbone, n_ctx, init))
        e, w = backbone.embed_dim, backbone.text_width
        hidden = max(e // int(self.hparams["meta_reduction"]), 1)
        self.meta_net = nn.Sequential(nn.Linear(e, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, w))

    def text_features(self, f: torch.Tensor) -> torch.Tensor:
        """[B, K, E]: one prompt set per image, context shifted by the meta-net."""
        # CoCoOp feeds the meta-net the L2-normalised image feature
        ctx = self.ctx.unsqueeze(0) + self.meta_net(F.normalize(f.float(), dim=-1).to(f.dtype)).unsqueeze(1)  # [B, M, W]
        return self.prompt_encoder(ctx)

    def training_losses(self, batch: Batch) -> dict:
        f = self.batch_features(batch).pooled
        # fused cosine CE over per-image class embeddings: no [B, K] logits kept for the backward
        return {"loss": dgkernels.cosine_cross_entropy(f, self.text_features(f), self.backbone.logit_scale, batch.labels)}

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        f = self.features(x).pooled
        return cosine_logits(f, self.text_features(f), self.backbone.logit_scale)
