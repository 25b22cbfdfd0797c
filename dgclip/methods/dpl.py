"""DPL, domain prompt learning (Zhang et al.): an MLP maps image features to M = 16 prompt
tokens; during training the tokens are averaged over each source domain's part of the batch
(D x K prompts).

Loss (`loss_form`), default = the released DPLCLIP.update (shogi880/DPLCLIP domainbed/algorithms.py):
every image is scored against ALL D x K prompts ([B, D*K] logits) with its label y in [0, K) as
the target, so the target column is always the FIRST source domain's prompt for class y and the
other domains' prompts of the same class are negatives. Options: "own_domain" (each image against
its own domain's K prompts) and "all_prompts_own_label" (the indexing fixed: target d*K + y).
At test time the tokens are averaged over the test batch ("batch", as the released code) or
computed per image ("instance", B x K prompts): option `test_prompt`. "batch" is transductive:
the engine scores it over seeded random batches of 64 (DomainBed's eval loaders, which DPL's
released code uses) and the record says `transductive: true`.
Released hparams: 3-layer MLP 512->512->512->512*16, dropout 0.1, SGD lr 1e-3, momentum 0.1,
weight decay 0, Xavier-uniform init with biases 0.01, batch 32 per source domain.
Option `ctx_init` (not in the paper, default off): the MLP output is added to the embedding of an
init phrase (e.g. "a photo of a" with n_ctx=4), so training starts from the zero-shot prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dgkernels

from ..prompting import ClassPromptEncoder, init_context
from . import register_method
from .base import Batch, Method, check_choice, cosine_logits


DPL_HP = "released: shogi880/DPLCLIP domainbed/hparams_registry.py:L86-101"
DPL_ALG = "released: shogi880/DPLCLIP domainbed/algorithms.py (DPLCLIP)"
LOSS_FORMS = ("released", "own_domain", "all_prompts_own_label")


@register_method("dpl")
class DPL(Method):
    open_set = False
    uses_frozen_features = True
    default_hparams = {"lr": 1e-3, "batch_size": 32, "batch_scope": "per_domain", "optimizer": "sgd", "momentum": 0.1,
                       "weight_decay": 0.0, "warmup_fraction": 0.0, "warmup_lr": 1e-5, "train_augment": "none",
                       "n_ctx": 16, "hidden": 0, "dropout": 0.1, "test_prompt": "batch", "ctx_init": "",
                       "loss_form": "released"}
    hparam_sources = {
        "lr": f"{DPL_HP} (lr 1e-3)",
        "batch_size": "released: facebookresearch/DomainBed domainbed/hparams_registry.py:L210-233 (32, kept by DPL)",
        "batch_scope": "released: facebookresearch/DomainBed domainbed/scripts/train.py:L146-152 (one loader per env)",
        "optimizer": f"{DPL_HP} (SGD)",
        "momentum": f"{DPL_HP} (momentum 0.1)",
        "weight_decay": f"{DPL_HP} (weight_decay 0)",
        "warmup_fraction": "released: facebookresearch/DomainBed domainbed/scripts/train.py (constant lr, no warm-up)",
        "warmup_lr": "project: unused while warmup_fraction is 0",
        "train_augment": f"released: shogi880/DPLCLIP domainbed/datasets.py:L211-219 (clip_transform: CLIP's eval "
                         f"preprocess for every env)",
        "n_ctx": f"{DPL_HP} (num_domain_tokens 16)",
        "hidden": f"{DPL_HP} (mlp_width 512 = the embedding width; 0 here means that width)",
        "dropout": f"{DPL_HP} (mlp_dropout 0.1)",
        "test_prompt": f"{DPL_ALG}.predict (mean of the MLP tokens over the test batch)",
        "ctx_init": "project: option off by default (not in the paper or code)",
        "loss_form": f"{DPL_ALG}.update (logits against all D x K prompts, CE with labels in [0, K))",
    }

    def __init__(self, backbone, classnames, num_domains, hparams):
        super().__init__(backbone, classnames, num_domains, hparams)
        check_choice(self.hparams, "test_prompt", ("batch", "instance"))
        check_choice(self.hparams, "loss_form", LOSS_FORMS)
        m = int(self.hparams["n_ctx"])
        e, w = backbone.embed_dim, backbone.text_width
        h = int(self.hparams["hidden"]) or e
        p = float(self.hparams["dropout"])
        self.mlp = nn.Sequential(nn.Linear(e, h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, h), nn.ReLU(),
                                 nn.Dropout(p), nn.Linear(h, w * m))
        for layer in self.mlp:  # the released code: Xavier-uniform weights, biases 0.01
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.constant_(layer.bias, 0.01)
        self.prompt_encoder = ClassPromptEncoder(backbone, self.classnames, m)
        base = init_context(backbone, m, self.hparams["ctx_init"]) if self.hparams["ctx_init"] else \
            torch.zeros(m, w)
        self.register_buffer("ctx_base", base)

    @property
    def transductive(self) -> bool:
        return self.hparams["test_prompt"] == "batch"

    def tokens(self, f: torch.Tensor) -> torch.Tensor:
        return self.ctx_base + self.mlp(f).view(f.shape[0], int(self.hparams["n_ctx"]), -1)  # [B, M, W]

    def training_losses(self, batch: Batch) -> dict:
        f = self.batch_features(batch).pooled
        tok = self.tokens(f)
        # per-domain mean tokens, all domains at once: one_hot^T @ tokens / counts
        dom, inverse = torch.unique(batch.domains, return_inverse=True)
        onehot = F.one_hot(inverse, len(dom)).to(tok.dtype)                     # [B, D]
        mean_tok = torch.einsum("bd,bmw->dmw", onehot, tok) / onehot.sum(0).view(-1, 1, 1)
        text = self.prompt_encoder(mean_tok)                                    # [D, K, E]
        form, k = self.hparams["loss_form"], self.num_classes
        if form == "own_domain":
            loss = dgkernels.cosine_cross_entropy(f, text[inverse], self.backbone.logit_scale, batch.labels)
        else:  # one [B, D*K] logit matrix: domain-major columns, as torch.cat over the domains' prompts
            target = batch.labels if form == "released" else inverse * k + batch.labels
            loss = dgkernels.cosine_cross_entropy(f, text.reshape(-1, text.shape[-1]), self.backbone.logit_scale, target)
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        f = self.features(x).pooled
        tok = self.tokens(f)
        if self.hparams["test_prompt"] == "batch":
            text = self.prompt_encoder(tok.mean(0))[0]           # [K, E]
        else:
            text = self.prompt_encoder(tok)                      # [B, K, E]
        return cosine_logits(f, text, self.backbone.logit_scale)
