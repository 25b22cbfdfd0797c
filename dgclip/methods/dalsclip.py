"""DALSCLIP (Image and Vision Computing 154:105359, 2025): remove domain-specific information from
CLIP image features and put it into the prompts instead.

Only the abstract is public; the design below is INFERRED (DESIGN.md section 2) and every reading
that is not forced by the abstract is an option:

1. Domain heads h_d (linear [K, E] per source domain) trained on the frozen features of domain d
   only (`dgkernels.domain_cross_entropy`). Heads see normalize(f) * sqrt(E) (unit variance per
   dimension, as in linear probing), and so do the agreement terms below.
2. A mapping f' = normalize(f - g(f)), g linear and zero-initialised (so f' starts as f;
   `dgkernels.mapper_project`), trained with the prompt CE on f' + agreement_weight * the heads'
   disagreement on f' (`dgkernels.head_agreement`, heads frozen) + stay_weight * ||f' - normalize(f)||^2.
3. An attention-based MLP (`AttentionPromptGenerator`) turns image features into M = 16 context
   tokens: in training one token set per source domain (attention and mean within the domain's
   images of the batch: D x K prompts), at test time per image (test_context="instance", B x K
   prompts, independent of the rest of the batch) or per test batch ("batch").
4. Logits logit_scale * cos(f', text(prompt_k)).

Schedule (schedule="two_stage", default, the abstract's "train a classifier per domain, then learn
a mapping"): the first head_fraction of the steps train only the heads; the rest train the mapper
and the prompt generator with the heads frozen. schedule="joint": both at every step (the heads'
own CE on f, the agreement term with detached heads). Trains on cached frozen features (no
augmentation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dgkernels

from . import register_method
from ..backbone import ImageFeatures
from .base import Batch, Method, check_choice, cosine_logits
from .prompt_modules import AttentionPromptGenerator, make_prompt_encoder


@register_method("dalsclip")
class DALSCLIP(Method):
    open_set = False
    uses_frozen_features = True
    default_hparams = {
        "optimizer": "sgd",
        "lr": 2e-3,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 32,
        "warmup_steps": 0,
        "train_augment": "none",  # | "crop" | "crop_flip" (then no feature cache)
        "n_ctx": 16,
        "generator_hidden": 0,  # 0 = the embedding width (DPL's 512 for ViT-B/16)
        "generator_dropout": 0.1,
        "generator_input": "raw",  # "raw" f (domain information for the prompts) | "mapped" f'
        "train_context": "domain",  # "domain" (D x K prompts) | "instance" (B x K)
        "test_context": "instance",  # "instance" | "batch"
        "schedule": "two_stage",  # "two_stage" | "joint"
        "head_fraction": 0.2,
        "head_lr_mult": 10.0,
        "agreement_weight": 1.0,
        "agreement_kind": "kl",
        "stay_weight": 0.1,
        "prompt_chunk_size": 0,
    }

    lr_log10_range = (-3.5, -2.0)
    weight_decay_log10_range = (-6.0, -3.0)
    batch_sizes = (16, 32, 64)

    @classmethod
    def search_space(cls, rng) -> dict:
        hp = super().search_space(rng)
        hp.update({
            "head_fraction": float(rng("head_fraction").choice([0.1, 0.2, 0.3])),
            "agreement_weight": float(10 ** rng("agreement_weight").uniform(-1, 1)),
            "stay_weight": float(10 ** rng("stay_weight").uniform(-2, 0)),
            "generator_dropout": float(rng("generator_dropout").choice([0.0, 0.1, 0.3])),
        })
        return hp

    def __init__(self, backbone, classnames, num_domains, hparams=None):
        super().__init__(backbone, classnames, num_domains, hparams or {})
        hp = self.hparams
        for key, allowed in (("schedule", ("two_stage", "joint")), ("train_context", ("domain", "instance")),
                             ("test_context", ("instance", "batch")), ("generator_input", ("raw", "mapped"))):
            check_choice(hp, key, allowed)
        dim, width, k = backbone.embed_dim, backbone.text_width, self.num_classes
        self.head_weight = nn.Parameter(torch.zeros(self.num_domains, k, dim))
        self.head_bias = nn.Parameter(torch.zeros(self.num_domains, k))
        self.map_weight = nn.Parameter(torch.zeros(dim, dim))  # g = 0 at start: f' = f
        self.map_bias = nn.Parameter(torch.zeros(dim))
        self.prompt_generator = AttentionPromptGenerator(dim, width, int(hp["n_ctx"]), int(hp["generator_hidden"]) or dim,
                                                         float(hp["generator_dropout"]))
        chunk = int(hp["prompt_chunk_size"]) or None
        self.encoder = make_prompt_encoder(backbone, self.classnames, chunk_size=chunk)
        self.head_scale = math.sqrt(dim)
        self.total_steps = 0
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.to(backbone.device)

    @property
    def transductive(self) -> bool:
        return self.hparams["test_context"] == "batch"

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        heads = [self.head_weight, self.head_bias]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("head_")]
        return [{"params": heads, "lr": self.hparams["lr"] * self.hparams["head_lr_mult"]}, {"params": rest}]

    def configure_optimizers(self, total_steps: int):
        self.total_steps = int(total_steps)
        return super().configure_optimizers(total_steps)

    @property
    def head_steps(self) -> int:
        return int(round(self.hparams["head_fraction"] * self.total_steps))

    def stage(self) -> str:
        """'heads' or 'mapping' (two_stage), or 'joint'."""
        if self.hparams["schedule"] == "joint":
            return "joint"
        return "heads" if int(self.steps_done) < self.head_steps else "mapping"

    # -- forward pieces -------------------------------------------------------------------------
    def mapped(self, pooled: torch.Tensor) -> torch.Tensor:
        """f' = normalize(f - g(f)): [B, E]."""
        return dgkernels.mapper_project(pooled, self.map_weight, self.map_bias, residual=True, normalize=True)

    def head_input(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=-1) * self.head_scale

    def prompt_text(self, pooled: torch.Tensor, mapped: torch.Tensor, group: torch.Tensor, num_groups: int | None,
                    pool: bool) -> torch.Tensor:
        source = pooled if self.hparams["generator_input"] == "raw" else mapped
        ctx = self.prompt_generator(F.normalize(source, dim=-1), group, pool=pool, num_groups=num_groups)
        return self.encoder(ctx).float()  # [G, K, E]

    def head_loss(self, pooled, labels, domains) -> torch.Tensor:
        return dgkernels.domain_cross_entropy(self.head_input(pooled), self.head_weight, self.head_bias, domains, labels)

    def mapping_losses(self, pooled, labels, domains) -> dict[str, torch.Tensor]:
        f_map = self.mapped(pooled)
        if self.hparams["train_context"] == "domain":
            text = self.prompt_text(pooled, f_map, domains, self.num_domains, pool=True)[domains]  # D x K prompts
        else:
            text = self.prompt_text(pooled, f_map, domains, None, pool=False)  # B x K prompts
        ce = dgkernels.cosine_cross_entropy(f_map, text, self.backbone.logit_scale, labels)
        agree = dgkernels.head_agreement(self.head_input(f_map), self.head_weight.detach(), self.head_bias.detach(),
                                         kind=self.hparams["agreement_kind"])
        stay = (f_map - F.normalize(pooled, dim=-1)).pow(2).sum(-1).mean()
        total = ce + self.hparams["agreement_weight"] * agree + self.hparams["stay_weight"] * stay
        return {"loss": total, "ce": ce, "agreement": agree, "stay": stay}

    def losses(self, pooled, labels, domains) -> dict[str, torch.Tensor]:
        stage = self.stage()
        if stage == "heads":
            head = self.head_loss(pooled, labels, domains)
            return {"loss": head, "heads": head}
        out = self.mapping_losses(pooled, labels, domains)
        if stage == "joint":
            out["heads"] = self.head_loss(pooled, labels, domains)
            out["loss"] = out["loss"] + out["heads"]
        return out

    def update(self, batch: Batch) -> dict[str, float]:
        self.train()
        batch = batch.to(self.backbone.device)
        pooled = self.batch_features(batch).pooled.float()
        out = self.losses(pooled, batch.labels, batch.domains)
        self.step(out["loss"])
        self.steps_done += 1
        return {k: float(v.detach()) for k, v in out.items()}

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """[B, K] logits from images or cached features (mapped features, test-time prompts)."""
        was = self.training
        self.eval()
        try:
            if isinstance(x, dict):
                x = x["original"]
            pooled = self.features(x if isinstance(x, ImageFeatures) else x.to(self.backbone.device)).pooled.float()
            f_map = self.mapped(pooled)
            if self.hparams["test_context"] == "instance":
                group = torch.arange(pooled.shape[0], device=pooled.device)
                text = self.prompt_text(pooled, f_map, group, None, pool=False)  # [B, K, E]
            else:
                text = self.prompt_text(pooled, f_map, None, None, pool=True)[0]  # [K, E]
            return cosine_logits(f_map, text, self.backbone.logit_scale)
        finally:
            self.train(was)
