"""SeeCLIP (arXiv 2511.16979): semantic-enhanced prompts for open-set domain generalization.

Per image, K_s = 4 learnable queries attend over the projected patch features and give semantic
tokens v_k; the mean patch feature gives a domain token Phi(mean_i f_i). Known prompts (per image
and class): [SOS][Phi(v_dom)][Psi_1(v_1)..Psi_Ks(v_Ks)] "classname." [EOS]; the unknown prompt:
[SOS][Phi(v_dom)][u_1..u_4] "unknown." [EOS]. Logits are (C+1)-way, last column = unknown.

Loss = L_ali + rep_weight * L_rep + coh_weight * L_coh + reg_weight * L_reg (1.0 / 0.5 / 1e-4):
  L_ali: (C+1)-way CE on the known images and on pseudo-unknowns (target C);
  L_rep = mean_{b,k} max(0, cos(u_b, t_{b,k}) - rep_margin): pushes the unknown prompt AWAY from
          the known ones (the paper's sign; the released code has it reversed: rep_sign=-1);
  L_coh as released (coh_centroid="released"): MSE(mean_b u_b, mean_b t_{b,y_b}) on L2-normalised
          text features; options "image" (MSE(u_b, mean_k t_{b,k})) and "batch";
  L_reg = sum_k ||Psi_k||_1 over the Psi weights (reg_reduction="sum", as the paper writes it;
          "mean" divides by the number of weights). Its EFFECTIVE weight is 1e-4: the paper's
          lambda = 0.01 (Eq. 7) sits inside gamma = 0.01 (Eq. 11), as in the released code; at
          1e-2 the L1 term (~10 at init on the tiny CLIP) dwarfs L_ali (~ln 7) and zeroes Psi.
Pseudo-unknowns: max(1, int(unknown_ratio * B)) per source domain per step (paper), B = 16 images
per step in total (the released PACS/VLCS scripts), from a generator behind one interface
(`pseudo_unknown.py`). Default "auto": the paper's generator, Stable Diffusion 1.5 through diffusers
(positive prompt "a [source domain] of an unknown class", negative prompt = the known class
names), when its weights are present on this machine; otherwise the named fallback
`unknown_fallback` ("feature": feature-space mixtures, no extra weights). The run record says
which generator ran (`run_notes`). Others: "pixel_composite", "diffusion" (required: an error when
its weights are missing), "feature", "none".
At test time the model sees only images (or their cached features): no label is an input.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dgkernels

from . import register_method
from ..backbone import ImageFeatures
from .base import Batch, Method, check_choice, cosine_logits
from .seeclip_losses import COH_CENTROIDS, cohesion_loss, l1_regularizer, repulsion_loss
from .prompt_modules import SemanticTokenizer, StackedLinear, make_prompt_encoder
from .pseudo_unknown import (GENERATORS, SD15_MODEL_ID, DiffusionUnknowns, FeatureSpaceUnknowns, PixelCompositeUnknowns,
                             UnknownRequest, denormalize_images, normalize_images)


PAPER = "paper: arXiv 2511.16979 (SeeCLIP)"
CHOICES = ("auto",) + GENERATORS


def _normalisation(backbone) -> tuple[tuple, tuple]:
    """Mean/std of the backbone's eval transform (OpenAI CLIP's when none is found)."""
    for t in getattr(getattr(backbone, "preprocess_val", None), "transforms", []) or []:
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@register_method("seeclip")
class SeeCLIP(Method):
    open_set = True
    uses_frozen_features = True  # the paper trains without augmentation: patch features are cacheable
    needs_patches = True
    default_hparams = {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "batch_size": 16,
        "batch_scope": "total",
        "warmup_fraction": 0.0,
        "warmup_lr": 1e-5,
        "n_semantic_tokens": 4,
        "n_unknown_ctx": 4,
        "unknown_name": "unknown",
        "rep_weight": 1.0,
        "coh_weight": 0.5,
        "reg_weight": 1e-4,  # effective: lambda 0.01 inside gamma 0.01
        "rep_margin": 0.5,
        "coh_centroid": "released",  # | "image" | "batch"
        "rep_sign": 1.0,  # +1 = paper (repel the unknown prompt); -1 = the released code's reversed sign, max(0, margin - cos)
        "reg_reduction": "sum",
        "unknown_generator": "auto",  # "auto" | "diffusion" | "feature" | "pixel_composite" | "none"
        "unknown_fallback": "feature",  # what "auto" runs when the diffusion weights are absent
        "unknown_ratio": 0.1,  # max(1, int(ratio * B)) pseudo-unknowns per source domain per step
        "unknown_noise_std": 0.2,
        "unknown_mix_low": 0.3,
        "unknown_mix_high": 0.7,
        "diffusion_model_id": SD15_MODEL_ID,
        "diffusion_guidance": 15.0,
        "diffusion_steps": 20,
        "prompt_chunk_size": 0,
    }
    hparam_sources = {
        "optimizer": f"{PAPER} implementation details (AdamW)",
        "lr": f"{PAPER} implementation details (lr 1e-3)",
        "weight_decay": f"{PAPER} implementation details (weight decay 1e-5)",
        "batch_size": "released: SeeCLIP scripts for PACS/VLCS (batch 16; 2 for OfficeHome/Mini-DomainNet)",
        "batch_scope": "released: SeeCLIP scripts (one loader over the pooled sources)",
        "warmup_fraction": f"{PAPER} (no warm-up described)",
        "warmup_lr": "project: unused while warmup_fraction is 0",
        "n_semantic_tokens": f"{PAPER} §3 (K_s = 4 semantic queries)",
        "n_unknown_ctx": f"{PAPER} §3 (unknown prompt [u_1..u_4])",
        "unknown_name": f"{PAPER} §3 (unknown prompt ends in 'unknown.')",
        "rep_weight": f"{PAPER} Eq. 11 (1.0 x L_rep)",
        "coh_weight": f"{PAPER} Eq. 11 (0.5 x L_coh)",
        "reg_weight": f"{PAPER} Eq. 7 + Eq. 11 (lambda 0.01 inside gamma 0.01: 1e-4 effective)",
        "rep_margin": f"{PAPER} Eq. 8 (margin 0.5)",
        "coh_centroid": "released: SeeCLIP training code (L_coh = MSE of the batch means)",
        "rep_sign": f"{PAPER} Eq. 8 (repulsion; the released code has the sign reversed)",
        "reg_reduction": f"{PAPER} Eq. 7 (sum_k ||Psi_k||_1)",
        "unknown_generator": f"{PAPER} §3.3 (semantic-guided diffusion; 'auto' falls back when no weights are present)",
        "unknown_fallback": "project: needs no extra weights and no images, so frozen features stay cacheable",
        "unknown_ratio": f"{PAPER} implementation details (max(1, int(0.1 B)) per source domain per step)",
        "unknown_noise_std": f"{PAPER} §3.3 (v_k + N(0, 0.2^2))",
        "unknown_mix_low": "project: feature fallback only, INFERRED mixing range (no paper value exists)",
        "unknown_mix_high": "project: feature fallback only, INFERRED mixing range (no paper value exists)",
        "diffusion_model_id": f"{PAPER} implementation details (Stable Diffusion 1.5)",
        "diffusion_guidance": f"{PAPER} implementation details (guidance 15)",
        "diffusion_steps": f"{PAPER} implementation details (20 steps)",
        "prompt_chunk_size": "project: speed only (0 = the encoder's default); never changes results",
    }

    weight_decay_log10_range = (-6.0, -3.0)
    batch_sizes = (8, 16, 32)

    @classmethod
    def search_space(cls, rng) -> dict:
        hp = super().search_space(rng)
        hp.update({
            "rep_weight": float(10 ** rng("rep_weight").uniform(-1, 0.5)),
            "coh_weight": float(10 ** rng("coh_weight").uniform(-1.5, 0.5)),
            "reg_weight": float(10 ** rng("reg_weight").uniform(-5, -3)),
            "unknown_ratio": float(rng("unknown_ratio").choice([0.1, 0.25, 0.5])),
            "unknown_noise_std": float(rng("unknown_noise_std").uniform(0.05, 0.4)),
        })
        return hp

    def __init__(self, backbone, classnames, num_domains, hparams=None, *, unknown_generator=None):
        super().__init__(backbone, classnames, num_domains, hparams or {})
        hp = self.hparams
        check_choice(hp, "unknown_generator", CHOICES)
        check_choice(hp, "unknown_fallback", GENERATORS)
        check_choice(hp, "coh_centroid", COH_CENTROIDS)
        check_choice(hp, "reg_reduction", ("sum", "mean"))
        self.domain_names: list[str] | None = None  # set by the engine (set_domain_names) for the diffusion prompt
        self.generator_note = ""
        kind = hp["unknown_generator"] if unknown_generator is None else "given"
        if kind == "auto":
            kind, self.generator_note = self._auto_generator()
        self.generator_kind = kind
        # pixel-space pseudo-unknowns need the batch's images: no cached features then
        self.uses_frozen_features = kind != "pixel_composite"
        dim, width, ks = backbone.embed_dim, backbone.text_width, int(hp["n_semantic_tokens"])
        self.tokenizer = SemanticTokenizer(dim, ks)
        self.phi = nn.Linear(dim, width)
        self.psi = StackedLinear(ks, dim, width)
        self.unknown_ctx = nn.Parameter(torch.randn(int(hp["n_unknown_ctx"]), width) * 0.02)
        chunk = int(hp["prompt_chunk_size"]) or None
        self.known_encoder = make_prompt_encoder(backbone, self.classnames, chunk_size=chunk)
        self.unknown_encoder = make_prompt_encoder(backbone, [hp["unknown_name"]], chunk_size=chunk)
        # the generator holds no trainable state: a plain attribute, never in the state dict
        object.__setattr__(self, "generator", unknown_generator if unknown_generator is not None else self._build_generator(kind))

    def _auto_generator(self) -> tuple[str, str]:
        """The paper's diffusion generator when diffusers and its weights are on this machine,
        else the named fallback; the second value says why (it goes into the run record)."""
        model_id = self.hparams["diffusion_model_id"]
        try:
            import diffusers  # noqa: F401

            if not Path(model_id).is_dir():  # a hub id: only its local cache counts (no download)
                from huggingface_hub import snapshot_download

                snapshot_download(model_id, local_files_only=True)
            return "diffusion", f"diffusion: {model_id} found locally"
        except Exception as exc:  # noqa: BLE001 - any reason the weights cannot be used offline
            fallback = self.hparams["unknown_fallback"]
            return fallback, (f"{fallback} (fallback): the diffusion generator {model_id} is not available here "
                              f"({type(exc).__name__})")

    def run_notes(self) -> dict:
        """What the run record should say about this run beyond its hyper-parameters."""
        return {"unknown_generator": self.generator_kind, "unknown_generator_note": self.generator_note}

    def set_domain_names(self, names: list[str]) -> None:
        """Source-domain names in domain-index order (the diffusion prompt names the domain)."""
        self.domain_names = list(names)
        if hasattr(self.generator, "domain_names"):
            self.generator.domain_names = list(names)

    def _build_generator(self, kind: str):
        hp = self.hparams
        if kind == "none":
            return None
        if kind == "feature":
            return FeatureSpaceUnknowns(hp["unknown_ratio"], hp["unknown_noise_std"], hp["unknown_mix_low"], hp["unknown_mix_high"])
        if kind == "pixel_composite":
            return PixelCompositeUnknowns(self.encode_generated, hp["unknown_ratio"])
        if kind == "diffusion":
            return DiffusionUnknowns.from_pretrained(
                self.classnames, self.encode_generated, model_id=hp["diffusion_model_id"], device=self.backbone.device,
                ratio=hp["unknown_ratio"], guidance_scale=hp["diffusion_guidance"], num_inference_steps=int(hp["diffusion_steps"]),
                token_noise_std=hp["unknown_noise_std"], domain_names=self.domain_names,
                local_files_only=self.generator_note.startswith("diffusion:"))
        raise ValueError(f"unknown_generator must be one of {GENERATORS}, got {kind!r}")

    def encode_generated(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated images in [0, 1] -> frozen (pooled, patches), through the backbone's normalisation."""
        mean, std = _normalisation(self.backbone)
        feats = self.backbone.image_features(normalize_images(images, self.backbone.image_size, mean, std), patches=True)
        return feats.pooled, feats.patches

    # -- forward pieces -------------------------------------------------------------------------
    def text_features(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patches [N, P, E] -> (known text [N, K, E], unknown text [N, E])."""
        tokens, _ = self.tokenizer(patches)  # [N, Ks, E]
        domain = self.phi(patches.to(self.phi.weight.dtype).mean(1))[:, None, :]  # [N, 1, W]
        known_ctx = torch.cat([domain, self.psi(tokens)], dim=1)  # [N, 1 + Ks, W]
        unknown_ctx = torch.cat([domain, self.unknown_ctx[None].expand(domain.shape[0], -1, -1)], dim=1)
        return self.known_encoder(known_ctx).float(), self.unknown_encoder(unknown_ctx)[:, 0].float()

    def losses(self, pooled: torch.Tensor, patches: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pooled [N, E], patches [N, P, E], labels [N] in 0..C (C = pseudo-unknown)."""
        hp = self.hparams
        known, unknown = self.text_features(patches)
        text = torch.cat([known, unknown[:, None]], dim=1)  # [N, C+1, E]
        ali = dgkernels.cosine_cross_entropy(pooled, text, self.backbone.logit_scale, labels)
        rep = repulsion_loss(unknown, known, hp["rep_margin"], hp["rep_sign"])
        coh = cohesion_loss(unknown, known, hp["coh_centroid"], labels)
        reg = l1_regularizer(self.psi.weight, hp["reg_reduction"])
        total = ali + hp["rep_weight"] * rep + hp["coh_weight"] * coh + hp["reg_weight"] * reg
        return {"loss": total, "ali": ali, "rep": rep, "coh": coh, "reg": reg}

    def training_inputs(self, batch: Batch, generator: torch.Generator | None = None):
        """Frozen features of the batch plus its pseudo-unknowns: (pooled, patches, labels)."""
        feats = self.batch_features(batch)
        pooled, patches, labels = feats.pooled, feats.patches, batch.labels
        if self.generator is not None:
            images = None
            if batch.images is not None:
                mean, std = _normalisation(self.backbone)
                images = denormalize_images(batch.original().float(), mean, std)
            fake = self.generator(UnknownRequest(pooled, patches, labels, batch.domains, images), generator=generator)
            if fake is not None:
                pooled = torch.cat([pooled, fake.pooled.to(pooled.dtype)])
                patches = torch.cat([patches, fake.patches.to(patches.dtype)])
                labels = torch.cat([labels, labels.new_full((fake.pooled.shape[0],), self.num_classes)])
        return pooled, patches, labels

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.losses(*self.training_inputs(batch))

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """[B, C+1] logits (last column = unknown) from images or cached features; no label is an input."""
        if isinstance(x, dict):
            x = x["original"]
        feats = self.features(x)
        known, unknown = self.text_features(feats.patches)
        return cosine_logits(feats.pooled, torch.cat([known, unknown[:, None]], dim=1), self.backbone.logit_scale)
