"""Batched prompt encoding for prompt-learning methods.

`ClassPromptEncoder(backbone, classnames, n_ctx)` encodes "[SOS] ctx_1..ctx_M <class name>. [EOS]"
for every class in ONE text-tower call, whatever the context shape:
  ctx [M, W]        -> [1, K, E]  (shared context, CoOp)
  ctx [G, M, W]     -> [G, K, E]  (one context per group: image (CoCoOp), domain (DPL))
  ctx [K, M, W] with class_specific=True, or [G, K, M, W] -> [G, K, E]
It uses `dgkernels.PromptEncoder` when that op is available (same call contract) and otherwise a
plain batched PyTorch path: frozen token embeddings of the class-name suffixes are computed once,
prompts are truncated to the longest EOT (exact under the causal mask), and no Python loop runs
over classes or images.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import CLIPBackbone

__all__ = ["ClassPromptEncoder", "init_context"]


def init_context(backbone: CLIPBackbone, n_ctx: int, init_text: str | None = None, std: float = 0.02,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """[M, W] context: embeddings of `init_text` (its first M tokens) or N(0, std^2)."""
    width = backbone.text_width
    if init_text:
        tok = backbone.tokenize([init_text])[0]
        eot = int(tok.argmax())
        ids = tok[1:eot]
        if len(ids) != n_ctx:
            raise ValueError(f"context init {init_text!r} has {len(ids)} tokens, n_ctx is {n_ctx}")
        with torch.no_grad():
            return backbone.model.token_embedding(ids).detach().float().clone().cpu()
    return torch.randn(n_ctx, width, generator=generator) * std


class ClassPromptEncoder(nn.Module):
    def __init__(self, backbone: CLIPBackbone, classnames: list[str], n_ctx: int, *,
                 suffix_template: str = "{}."):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # frozen; not part of the state dict
        self.n_ctx = int(n_ctx)
        self.num_classes = len(classnames)
        model = backbone.model
        placeholder = " ".join(["X"] * self.n_ctx)
        texts = [f"{placeholder} {suffix_template.format(c)}" for c in classnames]
        tokens = backbone.tokenize(texts)
        eot = tokens.argmax(dim=-1)
        if int(eot.max()) >= tokens.shape[1] - 1 and tokens[0, -1] != 0:
            raise ValueError(f"prompts do not fit the context length {tokens.shape[1]} with n_ctx={n_ctx}")
        length = int(eot.max()) + 1  # truncate: positions after the last EOT never influence it
        with torch.no_grad():
            emb = model.token_embedding(tokens[:, :length]).float()
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)               # [K, 1, W]
        self.register_buffer("suffix", emb[:, 1 + self.n_ctx:].clone(), persistent=False)  # [K, S, W]
        self.register_buffer("eot", eot.clone(), persistent=False)
        self.length = length

    def forward(self, ctx: torch.Tensor, *, class_specific: bool = False) -> torch.Tensor:
        K, M = self.num_classes, self.n_ctx
        if class_specific:
            if ctx.dim() == 3:
                ctx = ctx.unsqueeze(0)
            if ctx.dim() != 4 or ctx.shape[1] != K or ctx.shape[2] != M:
                raise ValueError(f"class-specific ctx must be [K={K}, M={M}, W] or [G, K, M, W], "
                                 f"got {tuple(ctx.shape)}")
        else:
            if ctx.dim() == 2:
                ctx = ctx.unsqueeze(0)
            if ctx.dim() != 3 or ctx.shape[1] != M:
                raise ValueError(f"ctx must be [M={M}, W] or [G, M, W], got {tuple(ctx.shape)}")
            ctx = ctx.unsqueeze(1).expand(-1, K, -1, -1)
        G = ctx.shape[0]
        prompts = torch.cat([self.prefix.expand(G, -1, -1, -1).to(ctx.dtype), ctx,
                             self.suffix.expand(G, -1, -1, -1).to(ctx.dtype)], dim=2)  # [G, K, L, W]
        feats = self._encode(prompts.reshape(G * K, self.length, -1), self.eot.repeat(G))
        return feats.view(G, K, -1)

    def _encode(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        model = self.backbone.model
        L = x.shape[1]
        with self.backbone.autocast():
            x = x + model.positional_embedding[:L].to(x.dtype)
            mask = model.attn_mask[:L, :L] if model.attn_mask is not None else None
            x = model.transformer(x, attn_mask=mask)
            x = model.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), eot]
            proj = model.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()
