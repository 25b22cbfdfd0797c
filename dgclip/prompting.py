"""Batched prompt encoding for prompt-learning methods.

`ClassPromptEncoder(backbone, classnames, n_ctx)` encodes "[SOS] ctx_1..ctx_M <class name>. [EOS]"
for every class in ONE text-tower call, whatever the context shape:
  ctx [M, W]        -> [1, K, E]  (shared context, CoOp)
  ctx [G, M, W]     -> [G, K, E]  (one context per group: image (CoCoOp), domain (DPL))
  ctx [K, M, W] with class_specific=True, or [G, K, M, W] -> [G, K, E]
All of it runs in `dgkernels.PromptEncoder` (truncation to the longest EOT, shared-prefix
attention; backend picked by dgkernels' dispatch, e.g. DGKERNELS_BACKEND=reference), with no
Python loop over classes or images.
"""
from __future__ import annotations

import torch
from torch import nn

import dgkernels

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
    """"[SOS] ctx_1..ctx_M <class name>. [EOS]" for every class through `dgkernels.PromptEncoder`.

    Outputs are L2-normalised text features [G, K, E] in float32, the tower run under the
    backbone's autocast. The encoder shares the frozen tower's tensors, so
    Method.method_state_dict leaves them out.
    """

    def __init__(self, backbone: CLIPBackbone, classnames: list[str], n_ctx: int, *,
                 suffix_template: str = "{}."):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # frozen; not part of the state dict
        self.n_ctx = int(n_ctx)
        self.num_classes = len(classnames)
        self.kernel = dgkernels.PromptEncoder(backbone.model, list(classnames), backbone.tokenizer,
                                              template=suffix_template)

    def forward(self, ctx: torch.Tensor, *, class_specific: bool = False) -> torch.Tensor:
        if ctx.shape[-2] != self.n_ctx:
            raise ValueError(f"ctx must have M={self.n_ctx} context vectors, got {tuple(ctx.shape)}")
        with self.backbone.autocast():
            return self.kernel(ctx, class_specific=class_specific).float()
