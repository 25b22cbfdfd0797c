"""Zero-shot CLIP: cosine to class-name prompts (one template or a template ensemble)."""
from __future__ import annotations

import torch
from torch import nn

from . import register_method
from .base import Batch, Method, cosine_logits

# A small subset of CLIP's ImageNet templates plus the digit phrasing used by the tiny CLIP.
ENSEMBLE_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "an image of a {}.",
                      "a photo of the number {}.", "a photo of the digit {}.")


@register_method("zero-shot")
class ZeroShot(Method):
    open_set = False
    uses_frozen_features = True
    default_hparams = {"template": "a photo of a {}.", "ensemble": False}
    hparam_sources = {
        "template": "paper: Radford et al., ICML 2021 (CLIP) §3.1.4 'A photo of a {label}.'; DPL Table 1 "
                    "'template prompt'",
        "ensemble": "project: single template by default (DPL Table 1's zero-shot row); ensemble is an option",
    }

    def __init__(self, backbone, classnames, num_domains, hparams):
        super().__init__(backbone, classnames, num_domains, hparams)
        templates = ENSEMBLE_TEMPLATES if self.hparams["ensemble"] else (self.hparams["template"],)
        texts = [t.format(c) for t in templates for c in self.classnames]  # one batched call
        feats = backbone.encode_text(texts).view(len(templates), self.num_classes, -1)
        feats = nn.functional.normalize(feats, dim=-1).mean(0)
        self.register_buffer("text_features", feats, persistent=False)

    @classmethod
    def search_space(cls, rng):
        return {"template": cls.default_hparams["template"], "ensemble": bool(rng("ensemble").integers(2))}

    def configure_optimizers(self, total_steps):
        self.optimizer = self.scheduler = None
        return None

    def update(self, batch: Batch) -> dict:
        return {}  # nothing to learn

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        f = self.features(x).pooled
        return cosine_logits(f, self.text_features.to(f.device), self.backbone.logit_scale)
