"""CoOp (Zhou et al., IJCV 2022): learnable context vectors before the class name.

Defaults = the released code (KaiyangZhou/CoOp with Dassl) where it produced the published
numbers: M = 16 context vectors, random N(0, 0.02) init, shared by all classes; CE on
logit_scale * cos; SGD lr 0.002, momentum 0.9, weight decay 5e-4, cosine after one epoch at a
constant 1e-5 (1 of 50 epochs: warmup_fraction 0.02); 32 images per step in total (Dassl's
RandomSampler over the pooled training set, not 32 per domain); train augmentation random resized
crop scale (0.08, 1) + horizontal flip, bicubic (Dassl transforms with the CoOp config).
"""
from __future__ import annotations

import torch
from torch import nn

import dgkernels

from ..prompting import ClassPromptEncoder, init_context
from . import register_method
from .base import Batch, Method, cosine_logits
from .eval_cache import EvalTextCache

COOP = "released: KaiyangZhou/CoOp"
DASSL = "released: KaiyangZhou/Dassl.pytorch"

# shared by CoOp and CoCoOp (both run on Dassl with the same transforms)
DASSL_AUGMENT_SOURCE = (f"{COOP} configs/trainers/CoOp/vit_b16_ep50.yaml:L8-13 (random_resized_crop, random_flip, "
                        f"bicubic) + {DASSL} dassl/config/defaults.py:L40 (RRCROP_SCALE (0.08, 1.0))")
DIGITS_NO_FLIP = ("project: a mirrored digit is another symbol (or none): on the embedded rotated digits the "
                  "random resized crop stays, the flip goes")


@register_method("coop")
class CoOp(Method):
    open_set = False
    uses_frozen_features = True  # only when train_augment = "none"
    default_hparams = {"lr": 2e-3, "batch_size": 32, "batch_scope": "total", "optimizer": "sgd", "momentum": 0.9,
                       "weight_decay": 5e-4, "warmup_fraction": 0.02, "warmup_lr": 1e-5, "train_augment": "crop_flip",
                       "n_ctx": 16, "class_specific": False, "ctx_init": ""}
    hparam_sources = {
        "lr": f"{COOP} configs/trainers/CoOp/vit_b16_ep50.yaml (OPTIM.LR 0.002)",
        "batch_size": f"{COOP} configs/trainers/CoOp/vit_b16_ep50.yaml (DATALOADER.TRAIN_X.BATCH_SIZE 32)",
        "batch_scope": f"{DASSL} dassl/config/defaults.py:L102 (RandomSampler over the pooled training set)",
        "optimizer": f"{DASSL} dassl/optim/optimizer.py:L105-113 (SGD)",
        "momentum": f"{DASSL} dassl/config/defaults.py:L151-156",
        "weight_decay": f"{DASSL} dassl/config/defaults.py:L151-156",
        "warmup_fraction": f"{COOP} configs/trainers/CoOp/vit_b16_ep50.yaml (WARMUP_EPOCH 1 of MAX_EPOCH 50)",
        "warmup_lr": f"{COOP} configs/trainers/CoOp/vit_b16_ep50.yaml (WARMUP_TYPE constant, WARMUP_CONS_LR 1e-5)",
        "train_augment": DASSL_AUGMENT_SOURCE,
        "n_ctx": f"{COOP} train.py:L90-95 (TRAINER.COOP.N_CTX 16)",
        "class_specific": f"{COOP} train.py:L90-95 (CSC False)",
        "ctx_init": f"{COOP} trainers/coop.py:L90-91 (CTX_INIT '': random N(0, 0.02) init)",
    }
    embedded_hparams = {"train_augment": "crop"}
    embedded_sources = {"train_augment": DIGITS_NO_FLIP}
    batch_sizes = (16, 32, 64)

    def __init__(self, backbone, classnames, num_domains, hparams):
        super().__init__(backbone, classnames, num_domains, hparams)
        n_ctx = int(self.hparams["n_ctx"])
        self.prompt_encoder = ClassPromptEncoder(backbone, self.classnames, n_ctx)
        ctx = init_context(backbone, n_ctx, self.hparams["ctx_init"] or None)
        if self.hparams["class_specific"]:
            ctx = ctx.unsqueeze(0).repeat(self.num_classes, 1, 1)
        self.ctx = nn.Parameter(ctx)
        # the class text features do not depend on the image: one text-tower pass per evaluation
        self._eval_text = EvalTextCache()

    @classmethod
    def search_space(cls, rng) -> dict:
        hp = super().search_space(rng)
        hp["n_ctx"] = int(rng("n_ctx").choice([4, 8, 16]))
        hp["class_specific"] = bool(rng("class_specific").integers(2))
        return hp

    def text_features(self) -> torch.Tensor:
        return self.prompt_encoder(self.ctx, class_specific=self.hparams["class_specific"])[0]

    def logits(self, x) -> torch.Tensor:
        text = self._eval_text.get(self, self.text_features)  # recomputed unless eval mode without grad
        return cosine_logits(self.features(x).pooled, text, self.backbone.logit_scale)

    def train(self, mode: bool = True):
        # every mode change (the engine's eval() before each evaluation pass, train() after) drops
        # the cached text features
        self._eval_text.clear()
        return super().train(mode)

    def training_losses(self, batch: Batch) -> dict:
        f = self.batch_features(batch).pooled
        # fused cosine CE: no [B, K] logits kept for the backward
        return {"loss": dgkernels.cosine_cross_entropy(f, self.text_features(), self.backbone.logit_scale, batch.labels)}

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        return self.logits(x)
