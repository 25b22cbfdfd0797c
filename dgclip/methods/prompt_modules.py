"""Small trainable modules shared by DALSCLIP, GOPro and SeeCLIP.

Each one turns frozen image features into prompt context tokens (width = the text tower's token
width). All of them are batched over images, layers and queries: no Python loop over any of them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _linear_init_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # nn.Linear's default init, for stacked [..., in, out] weights
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class StackedLinear(nn.Module):
    """G independent Linear(in, out) maps applied as one einsum.

    x [B, G, in] -> [B, G, out] (map g on slot g), or x [B, in] -> [B, G, out] (every map on x).
    Used for GOPro's per-layer style/content maps and SeeCLIP's per-token Psi_k.
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        _linear_init_(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            y = torch.einsum("bi,gio->bgo", x, self.weight)
        else:
            y = torch.einsum("bgi,gio->bgo", x, self.weight)
        return y if self.bias is None else y + self.bias


class StyleContentShift(nn.Module):
    """GOPro's context shift from per-layer token statistics (mean mu_l, std sigma_l).

    style_l = Linear_l((mu_l + sigma_l) / 2), content_l = Linear'_l(mu_l), m_l = (style_l + content_l) / 2,
    shift = Linear(L -> 1) over the layer axis: one ctx_dim vector per image.
    zero_init: start the layer mix at zero, so training starts from the plain context (the shift
    is otherwise far larger than CLIP's token embeddings and scrambles the initial prompts).
    """

    def __init__(self, num_layers: int, width: int, ctx_dim: int, *, zero_init: bool = False):
        super().__init__()
        self.style = StackedLinear(num_layers, width, ctx_dim)
        self.content = StackedLinear(num_layers, width, ctx_dim)
        self.layer_mix = nn.Linear(num_layers, 1)
        if zero_init:
            nn.init.zeros_(self.layer_mix.weight)
            nn.init.zeros_(self.layer_mix.bias)

    def forward(self, layer_mean: torch.Tensor, layer_std: torch.Tensor) -> torch.Tensor:
        if layer_mean.shape != layer_std.shape or layer_mean.dim() != 3:
            raise ValueError(f"layer_mean and layer_std must both be [B, L, W]; got {tuple(layer_mean.shape)} and {tuple(layer_std.shape)}")
        dtype = self.style.weight.dtype
        mu, sigma = layer_mean.to(dtype), layer_std.to(dtype)
        m = 0.5 * (self.style(0.5 * (mu + sigma)) + self.content(mu))  # [B, L, C]
        return self.layer_mix(m.transpose(1, 2)).squeeze(-1)  # [B, C]


def prompt_mlp(feat_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """DPL's 3-layer MLP (ReLU, dropout) from an attended feature to the flattened context tokens."""
    return nn.Sequential(
        nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


class AttentionPromptGenerator(nn.Module):
    """DALSCLIP's attention-based MLP: image features -> M context tokens.

    Single-head self-attention over the features of one group (a source domain in a training
    batch, or the test batch), residual, then a DPL-style 3-layer MLP to M * ctx_dim. Groups are a
    block mask on one attention call; pooling to one token set per group is a scatter-mean.
    """

    def __init__(self, feat_dim: int, ctx_dim: int, n_ctx: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or feat_dim
        self.n_ctx, self.ctx_dim = n_ctx, ctx_dim
        self.norm = nn.LayerNorm(feat_dim)
        self.qkv = nn.Linear(feat_dim, 3 * feat_dim)
        self.out = nn.Linear(feat_dim, feat_dim)
        self.mlp = prompt_mlp(feat_dim, hidden, n_ctx * ctx_dim, dropout)

    def forward(self, features: torch.Tensor, group: torch.Tensor | None = None, *, pool: bool = True,
                num_groups: int | None = None) -> torch.Tensor:
        """features [N, F]; group [N] in [0, G) (None: one group).

        pool=True returns [G, M, C] (mean over each group's tokens; an empty group gets zeros),
        pool=False returns [N, M, C] (per instance, after attending within its group).
        """
        n = features.shape[0]
        x = features.to(self.qkv.weight.dtype)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        mask = None
        if group is not None:
            mask = group[:, None] == group[None, :]  # attend only within a group
        att = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=None if mask is None else mask[None])[0]
        tokens = self.mlp(x + self.out(att))  # [N, M*C]
        if pool:
            if group is None:
                tokens = tokens.mean(0, keepdim=True)
            else:
                g = int(num_groups if num_groups is not None else int(group.max()) + 1)
                sums = tokens.new_zeros(g, tokens.shape[1]).index_add_(0, group, tokens)
                counts = torch.bincount(group, minlength=g).clamp_min(1).to(tokens.dtype)
                tokens = sums / counts[:, None]
        return tokens.view(tokens.shape[0] if pool else n, self.n_ctx, self.ctx_dim)


class TokenAttentionPromptGenerator(nn.Module):
    """DALSCLIP's attention-based MLP over SEVERAL tokens per image: image features -> M context tokens.

    tokens [B, T, F] (T >= 2; DALSCLIP: the image feature, the domain-specific part the mapping
    removes, and what each domain head sees); the first token queries all T (single-head scaled
    dot-product attention, pre-LayerNorm), the attended value is added to it (residual), then a
    DPL-style 3-layer MLP maps it to M * ctx_dim. With T = 1 the softmax is 1 and the module is an
    MLP: the caller must give it more than one token.
    """

    def __init__(self, feat_dim: int, ctx_dim: int, n_ctx: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or feat_dim
        self.n_ctx, self.ctx_dim = n_ctx, ctx_dim
        self.norm = nn.LayerNorm(feat_dim)
        self.q = nn.Linear(feat_dim, feat_dim)
        self.kv = nn.Linear(feat_dim, 2 * feat_dim)
        self.out = nn.Linear(feat_dim, feat_dim)
        self.mlp = prompt_mlp(feat_dim, hidden, n_ctx * ctx_dim, dropout)

    def attention(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attended [B, F], weights [B, T]) of the first token over all T."""
        if tokens.dim() != 3 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [B, T >= 2, F]; got {tuple(tokens.shape)}")
        x = self.norm(tokens.to(self.q.weight.dtype))
        q = self.q(x[:, 0])  # [B, F]
        k, v = self.kv(x).chunk(2, dim=-1)  # [B, T, F] each
        w = torch.softmax(torch.einsum("bf,btf->bt", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.einsum("bt,btf->bf", w, v), w

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(tokens)
        h = tokens[:, 0].to(attended.dtype) + self.out(attended)
        return self.mlp(h).view(tokens.shape[0], self.n_ctx, self.ctx_dim)


class SemanticTokenizer(nn.Module):
    """SeeCLIP's semantic tokens: K_s learnable queries attend over an image's patch features.

    alpha[b, k, i] = softmax_i(f_{b,i} . q_k); v[b, k] = sum_i alpha[b, k, i] f_{b,i}.
    `scale` multiplies the dot products (1.0 = the paper's plain dot product).
    """

    def __init__(self, dim: int, n_queries: int = 4, scale: float = 1.0):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * dim ** -0.5)
        self.scale = scale

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if patches.dim() != 3 or patches.shape[-1] != self.queries.shape[-1]:
            raise ValueError(f"patches must be [B, P, {self.queries.shape[-1]}]; got {tuple(patches.shape)}")
        f = patches.to(self.queries.dtype)
        alpha = torch.softmax(self.scale * torch.einsum("bpe,ke->bkp", f, self.queries), dim=-1)
        return torch.einsum("bkp,bpe->bke", alpha, f), alpha


def make_prompt_encoder(backbone, classnames: list[str], *, chunk_size: int | None = None):
    """The batched prompt encoder (dgkernels.PromptEncoder) over the backbone's frozen text tower:
    a bfloat16 copy of the tower on CUDA (LayerNorms in float32), the model's own weights on CPU."""
    import dgkernels

    dtype = torch.bfloat16 if backbone.device.type == "cuda" else None
    return dgkernels.PromptEncoder(backbone.model, list(classnames), backbone.tokenizer, dtype=dtype, chunk_size=chunk_size)


def initial_context(encoder, n_ctx: int, phrase: str | None) -> torch.Tensor:
    """[n_ctx, W] float32 context: the embeddings of `phrase` (must tokenise to n_ctx tokens), or N(0, 0.02^2)."""
    ctx = encoder.initial_context(n_ctx, phrase)
    if ctx.shape[0] != n_ctx:
        raise ValueError(f"ctx_init {phrase!r} tokenises to {ctx.shape[0]} tokens but n_ctx = {n_ctx}")
    return ctx
