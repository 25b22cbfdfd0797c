"""DALSCLIP (Image and Vision Computing 154:105359, 2025): remove domain-specific information from
CLIP image features and put it into the prompts instead.

Only the abstract is public ("train a classifier per source domain to capture domain-specific
information, then learn a mapping that removes it; an attention-based MLP produces prompts that
carry domain-specific information"). Every step of the abstract is ON by default; everything
beyond it is INFERRED (DESIGN.md sec. 2) and a named option:

1. Domain heads h_d (linear [K, E] per source domain) trained on the frozen features of domain d
   only (`dgkernels.domain_cross_entropy`), on normalize(f) * sqrt(E). schedule="joint" (default):
   the heads train at every step; "two_stage": the first head_fraction of the steps train only
   the heads, then they are frozen.
2. The LEARNED mapping that removes the domain-specific information (removal="learned", default):
   f' = normalize(f - g(f)), g linear and zero-initialised (`dgkernels.mapper_project`), trained
   with + agreement_weight * the heads' disagreement on f' (`dgkernels.head_agreement`) +
   stay_weight * ||f' - normalize(f)||^2. Options: "head_directions" (project out the top
   removal_rank directions along which the heads disagree, no trainable weights), "none".
3. Prompts: an attention-based MLP over SEVERAL tokens per image (generator_attention="tokens",
   default; `TokenAttentionPromptGenerator`): the image feature attends over [f, f - f' (what the
   mapping removed), e_1..e_D (e_d = softmax(h_d(f)) W_d, what domain head d sees)], then the MLP
   gives n_ctx context tokens, a residual on the embedding of ctx_init ("a photo of a") with the
   last layer zero-initialised, so training starts from the zero-shot prompt (prompt_residual).
   Option "batch": self-attention over the images of a source domain (training) or of the test
   batch (test; transductive), `train_context` / `test_context`.
4. Logits: log_softmax(logit_scale * cos(f', text)) + head_logit_weight * log_softmax(mean_d h_d(f'))
   (the domain heads aggregated with the prompt logits, default weight 1: the heads reach the
   prediction; 0 = prompts only), trained with CE (heads detached in this term) and used for
   prediction.
Trains on cached frozen features unless train_augment is set.
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
from .prompt_modules import (AttentionPromptGenerator, TokenAttentionPromptGenerator, initial_context,
                             make_prompt_encoder)

ABSTRACT = "paper: Image and Vision Computing 154:105359 (2025), abstract"
INFERRED = "project: INFERRED beyond the abstract"


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
        "batch_scope": "per_domain",
        "warmup_fraction": 0.0,
        "warmup_lr": 1e-5,
        "train_augment": "none",  # | "crop" | "crop_flip" (then no feature cache)
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "prompt_residual": True,  # tokens = embed(ctx_init) + MLP(...), last layer zero-initialised
        "generator_attention": "tokens",  # | "batch"
        "generator_hidden": 0,  # 0 = the embedding width (DPL's 512 for ViT-B/16)
        "generator_dropout": 0.1,
        "generator_input": "raw",  # "raw" f (domain information for the prompts) | "mapped" f'
        "train_context": "domain",  # generator_attention="batch" only: "domain" (D x K) | "instance"
        "test_context": "batch",  # generator_attention="batch" only: "batch" (transductive) | "instance"
        "removal": "learned",  # | "head_directions" | "none"
        "removal_rank": 2,
        "head_logit_weight": 1.0,
        "schedule": "joint",  # | "two_stage"
        "head_fraction": 0.2,
        "head_lr_mult": 1.0,
        "agreement_weight": 1.0,
        "agreement_kind": "kl",
        "stay_weight": 0.1,
        "prompt_chunk_size": 0,
    }
    hparam_sources = {
        "optimizer": f"{INFERRED}: CoOp's SGD recipe, the prompt-learning default (no published value)",
        "lr": f"{INFERRED}: CoOp's lr 0.002 (no published value)",
        "momentum": f"{INFERRED}: CoOp's SGD momentum 0.9 (no published value)",
        "weight_decay": f"{INFERRED}: CoOp's 5e-4 (no published value)",
        "batch_size": "released: facebookresearch/DomainBed domainbed/hparams_registry.py:L210-233 (32 per env)",
        "batch_scope": "released: facebookresearch/DomainBed domainbed/scripts/train.py:L146-152 (per-domain heads "
                       "need every source domain in each step)",
        "warmup_fraction": f"{INFERRED}: no warm-up (none published)",
        "warmup_lr": "project: unused while warmup_fraction is 0",
        "train_augment": f"{INFERRED}: frozen features of the eval transform (none published)",
        "n_ctx": f"{INFERRED}: the 4 tokens of ctx_init",
        "ctx_init": f"{INFERRED}: CoCoOp's 'a photo of a' initialisation",
        "prompt_residual": f"{INFERRED}: training starts from the zero-shot prompt",
        "generator_attention": f"{ABSTRACT} ('an attention-based MLP'); over several tokens per image so the "
                               f"attention is not an identity",
        "generator_hidden": f"{INFERRED}: DPL's MLP width = the embedding width",
        "generator_dropout": "released: shogi880/DPLCLIP domainbed/hparams_registry.py:L86-101 (mlp_dropout 0.1)",
        "generator_input": f"{ABSTRACT} (prompts carry the domain-specific information: the raw feature)",
        "train_context": f"{INFERRED}: generator_attention='batch' only, DPL's per-domain means",
        "test_context": f"{INFERRED}: generator_attention='batch' only, DPL's test-batch mean",
        "removal": f"{ABSTRACT} ('learn a mapping that removes it')",
        "removal_rank": f"{INFERRED}: removal='head_directions' only",
        "head_logit_weight": f"{ABSTRACT} (the per-domain classifiers reach the prediction); weight 1 = equal vote",
        "schedule": f"{INFERRED}: heads and mapping trained together",
        "head_fraction": f"{INFERRED}: schedule='two_stage' only",
        "head_lr_mult": f"{INFERRED}: one learning rate",
        "agreement_weight": f"{INFERRED}: the removal term weighted as the CE",
        "agreement_kind": f"{INFERRED}: KL between each head and the heads' mean",
        "stay_weight": f"{INFERRED}: small pull to CLIP's space",
        "prompt_chunk_size": "project: speed only (0 = the encoder's default); never changes results",
    }
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
            "removal_rank": int(rng("removal_rank").choice([1, 2, 4])),
            "head_logit_weight": float(rng("head_logit_weight").choice([0.0, 0.5, 1.0, 2.0])),
        })
        return hp

    def __init__(self, backbone, classnames, num_domains, hparams=None):
        super().__init__(backbone, classnames, num_domains, hparams or {})
        hp = self.hparams
        for key, allowed in (("schedule", ("two_stage", "joint")), ("train_context", ("domain", "instance")),
                             ("test_context", ("instance", "batch")), ("generator_input", ("raw", "mapped")),
                             ("removal", ("head_directions", "learned", "none")),
                             ("generator_attention", ("tokens", "batch"))):
            check_choice(hp, key, allowed)
        dim, width, k = backbone.embed_dim, backbone.text_width, self.num_classes
        n_ctx = int(hp["n_ctx"])
        self.head_weight = nn.Parameter(torch.zeros(self.num_domains, k, dim))
        self.head_bias = nn.Parameter(torch.zeros(self.num_domains, k))
        if hp["removal"] == "learned":
            self.map_weight = nn.Parameter(torch.zeros(dim, dim))  # g = 0 at start: f' = f
            self.map_bias = nn.Parameter(torch.zeros(dim))
        gen_cls = TokenAttentionPromptGenerator if hp["generator_attention"] == "tokens" else AttentionPromptGenerator
        self.prompt_generator = gen_cls(dim, width, n_ctx, int(hp["generator_hidden"]) or dim,
                                        float(hp["generator_dropout"]))
        chunk = int(hp["prompt_chunk_size"]) or None
        self.encoder = make_prompt_encoder(backbone, self.classnames, chunk_size=chunk)
        base = torch.zeros(n_ctx, width)
        if hp["prompt_residual"]:
            if hp["ctx_init"]:
                base = initial_context(self.encoder, n_ctx, hp["ctx_init"]).float()
            last = self.prompt_generator.mlp[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.register_buffer("ctx_base", base)
        self.head_scale = math.sqrt(dim)
        self.total_steps = 0
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def transductive(self) -> bool:
        return self.hparams["generator_attention"] == "batch" and self.hparams["test_context"] == "batch"

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
    def removal_basis(self) -> torch.Tensor:
        """[E, r] orthonormal directions along which the (detached) domain heads disagree."""
        w = self.head_weight.detach().float()
        dev = (w - w.mean(0, keepdim=True)).reshape(-1, w.shape[-1])  # [D*K, E]
        r = min(int(self.hparams["removal_rank"]), min(dev.shape))
        if r <= 0 or not torch.any(dev != 0):
            return dev.new_zeros(w.shape[-1], 0)
        _, _, vh = torch.linalg.svd(dev, full_matrices=False)
        return vh[:r].t()

    def mapped(self, pooled: torch.Tensor) -> torch.Tensor:
        """f' [B, E] (unit norm): f with its domain-specific part removed (option `removal`)."""
        kind = self.hparams["removal"]
        if kind == "learned":
            return dgkernels.mapper_project(pooled, self.map_weight, self.map_bias, residual=True, normalize=True)
        f = F.normalize(pooled.float(), dim=-1)
        if kind == "head_directions":
            u = self.removal_basis()
            f = F.normalize(f - (f @ u) @ u.t(), dim=-1)
        return f

    def head_input(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=-1) * self.head_scale

    def generator_tokens(self, pooled: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
        """[B, D + 2, E] unit-norm tokens per image: the image feature (raw or mapped, option
        generator_input), the part the mapping removed (f - f'), and e_d = softmax(h_d(f)) W_d for
        each domain head d (heads detached: they stay the domain classifiers)."""
        f = F.normalize(pooled.float(), dim=-1)
        first = f if self.hparams["generator_input"] == "raw" else mapped
        w, b = self.head_weight.detach(), self.head_bias.detach()
        probs = torch.softmax(torch.einsum("be,dke->bdk", self.head_input(f), w) + b, dim=-1)  # [B, D, K]
        seen = torch.einsum("bdk,dke->bde", probs, w)  # [B, D, E]
        removed = f - mapped
        tokens = torch.cat([first[:, None], removed[:, None], seen], dim=1)
        # the removed part is 0 at start (g = 0): F.normalize keeps a zero vector at zero
        return F.normalize(tokens, dim=-1)

    def prompt_text(self, pooled: torch.Tensor, mapped: torch.Tensor, group: torch.Tensor | None,
                    num_groups: int | None, pool: bool) -> torch.Tensor:
        if self.hparams["generator_attention"] == "tokens":
            ctx = self.ctx_base + self.prompt_generator(self.generator_tokens(pooled, mapped))
            return self.encoder(ctx).float()  # [B, K, E]
        source = pooled if self.hparams["generator_input"] == "raw" else mapped
        ctx = self.ctx_base + self.prompt_generator(F.normalize(source, dim=-1), group, pool=pool, num_groups=num_groups)
        return self.encoder(ctx).float()  # [G, K, E]

    def aggregated_logits(self, f_map: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Prompt log-probabilities + head_logit_weight * the domain heads' mean log-probabilities."""
        logits = cosine_logits(f_map, text, self.backbone.logit_scale)
        w = float(self.hparams["head_logit_weight"])
        if w == 0:
            return logits
        heads = torch.einsum("be,dke->bdk", self.head_input(f_map), self.head_weight.detach()) + self.head_bias.detach()
        return F.log_softmax(logits, -1) + w * F.log_softmax(heads.mean(1), -1)

    def head_loss(self, pooled, labels, domains) -> torch.Tensor:
        return dgkernels.domain_cross_entropy(self.head_input(pooled), self.head_weight, self.head_bias, domains, labels)

    def mapping_losses(self, pooled, labels, domains) -> dict[str, torch.Tensor]:
        f_map = self.mapped(pooled)
        if self.hparams["generator_attention"] == "tokens":
            text = self.prompt_text(pooled, f_map, None, None, pool=False)  # B x K prompts
        elif self.hparams["train_context"] == "domain":
            text = self.prompt_text(pooled, f_map, domains, self.num_domains, pool=True)[domains]  # D x K prompts
        else:
            own = torch.arange(pooled.shape[0], device=pooled.device)  # each image alone, as at test time
            text = self.prompt_text(pooled, f_map, own, None, pool=False)  # B x K prompts
        ce = F.cross_entropy(self.aggregated_logits(f_map, text), labels)
        out = {"loss": ce, "ce": ce}
        if self.hparams["removal"] == "learned":
            agree = dgkernels.head_agreement(self.head_input(f_map), self.head_weight.detach(), self.head_bias.detach(),
                                             kind=self.hparams["agreement_kind"])
            stay = (f_map - F.normalize(pooled, dim=-1)).pow(2).sum(-1).mean()
            out.update(agreement=agree, stay=stay,
                       loss=ce + self.hparams["agreement_weight"] * agree + self.hparams["stay_weight"] * stay)
        return out

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

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        pooled = self.batch_features(batch).pooled.float()
        out = self.losses(pooled, batch.labels, batch.domains)
        if self.training:
            self.steps_done += 1  # the two-stage schedule counts optimisation steps
        return out

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """[B, K] logits from images or cached features (mapped features, test-time prompts)."""
        if isinstance(x, dict):
            x = x["original"]
        pooled = self.features(x).pooled.float()
        f_map = self.mapped(pooled)
        if self.hparams["generator_attention"] == "tokens":
            text = self.prompt_text(pooled, f_map, None, None, pool=False)  # [B, K, E]
        elif self.hparams["test_context"] == "instance":
            group = torch.arange(pooled.shape[0], device=pooled.device)
            text = self.prompt_text(pooled, f_map, group, None, pool=False)  # [B, K, E]
        else:
            text = self.prompt_text(pooled, f_map, None, None, pool=True)[0]  # [K, E]
        return self.aggregated_logits(f_map, text)
