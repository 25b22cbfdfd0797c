"""The text tower of an open_clip model, read as plain weights, and its truncated forward passes.

Nothing here imports open_clip or patches its modules: `resolve(model)` reads the parameters of a
`CLIP` (text weights on the model itself), a `CustomTextCLIP` (`model.text`) or a bare
`TextTransformer`, and the forward functions below re-run the same arithmetic as
`ResidualAttentionBlock` with those weights:

    x = x + ls_1(attn(ln_1(x)))      attn: causal multi-head attention, in_proj / out_proj
    x = x + ls_2(mlp(ln_2(x)))       mlp:  c_fc -> act -> c_proj

LayerNorms run in float32 and cast back to the activation dtype (open_clip's LayerNormFp32; for
float32 models identical to its LayerNorm). Two passes are provided:
  * `dense_forward`: [N, L, W] sequences, causal attention through torch SDPA (encode_text after
    truncating to the longest pooled position);
  * `PrefixSharedStack`: one stream of G shared prefixes and one packed stream of suffix tokens
    whose attention reads the prefix keys/values of their group (encode_prompts).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._validate import acc_dtype, compiling


@dataclass
class Norm:
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        acc = acc_dtype(x.dtype)  # float32 LN for 16-bit
        w = None if self.weight is None else self.weight.to(acc)
        b = None if self.bias is None else self.bias.to(acc)
        return F.layer_norm(x.to(acc), (x.shape[-1],), w, b, self.eps).to(x.dtype)


@dataclass
class Layer:
    ln_1: Norm
    in_w: torch.Tensor  # [3W, W]
    in_b: Optional[torch.Tensor]
    out_w: torch.Tensor  # [W, W]
    out_b: Optional[torch.Tensor]
    ls_1: Optional[torch.Tensor]  # LayerScale gamma or None
    ln_2: Norm
    fc_w: torch.Tensor
    fc_b: Optional[torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    proj_w: torch.Tensor
    proj_b: Optional[torch.Tensor]
    ls_2: Optional[torch.Tensor]

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_1(x), self.in_w, self.in_b)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual after attention (attn: [..., W] head-merged), then the MLP residual."""
        a = F.linear(attn, self.out_w, self.out_b)
        x = x + (a if self.ls_1 is None else a * self.ls_1)
        m = F.linear(self.act(F.linear(self.ln_2(x), self.fc_w, self.fc_b)), self.proj_w, self.proj_b)
        return x + (m if self.ls_2 is None else m * self.ls_2)


@dataclass
class TextTower:
    token_embedding: torch.Tensor  # [V, W]
    positional_embedding: torch.Tensor  # [C, W]
    layers: list[Layer]
    heads: int
    ln_final: Norm
    projection: Optional[torch.Tensor]  # [W, E] (x @ projection), or None
    projection_bias: Optional[torch.Tensor]
    pool_type: str
    eos_id: Optional[int]
    dtype: torch.dtype  # activation dtype (open_clip's cast dtype)

    @property
    def width(self) -> int:
        return self.token_embedding.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def output_dim(self) -> int:
        return self.width if self.projection is None else self.projection.shape[1]

    @property
    def device(self) -> torch.device:
        return self.token_embedding.device

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position pooled for each token row, as open_clip's text_global_pool picks it."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        raise ValueError(f"text pool type {self.pool_type!r} pools no single token; encode_text cannot truncate it")


def _norm(module, what: str) -> Norm:
    if not isinstance(module, torch.nn.LayerNorm):
        raise TypeError(f"{what} must be a LayerNorm, got {type(module).__name__}")
    return Norm(module.weight, module.bias, module.eps)


def _layer_scale(module) -> Optional[torch.Tensor]:
    if isinstance(module, torch.nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise TypeError(f"unsupported layer-scale module {type(module).__name__}")
    return gamma


def _is_identity(module) -> bool:
    return module is None or isinstance(module, torch.nn.Identity)


def _layer(block, i: int) -> tuple[Layer, int]:
    attn = block.attn
    where = f"text block {i}"
    if isinstance(attn, torch.nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError(f"{where}: MultiheadAttention with separate q/k/v weights or bias_k is not supported")
        if hasattr(block, "ln_1_kv"):
            raise TypeError(f"{where}: cross-attention blocks are not a causal text tower")
        heads = attn.num_heads
    else:  # open_clip's own Attention (CustomResidualAttentionBlock)
        unsupported = [name for name, bad in (
            ("scaled_cosine", getattr(attn, "scaled_cosine", False)),
            ("scale_heads", getattr(attn, "head_scale", None) is not None),
            ("qk_norm", not _is_identity(getattr(attn, "ln_q", None))),
            ("inner_norm", not _is_identity(getattr(attn, "ln_inner", None))),
            ("scale_attn", not _is_identity(getattr(block, "ln_attn", None))),
            ("scale_fc", not _is_identity(getattr(block.mlp, "ln", None))),
        ) if bad]
        if unsupported or not hasattr(attn, "in_proj_weight"):
            raise TypeError(f"{where}: attention options {unsupported or [type(attn).__name__]} are not supported "
                            "(only the standard pre-LN causal block is)")
        heads = attn.num_heads
    mlp = block.mlp
    layer = Layer(
        ln_1=_norm(block.ln_1, f"{where}.ln_1"),
        in_w=attn.in_proj_weight, in_b=attn.in_proj_bias,
        out_w=attn.out_proj.weight, out_b=attn.out_proj.bias,
        ls_1=_layer_scale(block.ls_1),
        ln_2=_norm(block.ln_2, f"{where}.ln_2"),
        fc_w=mlp.c_fc.weight, fc_b=mlp.c_fc.bias, act=mlp.gelu,
        proj_w=mlp.c_proj.weight, proj_b=mlp.c_proj.bias,
        ls_2=_layer_scale(block.ls_2),
    )
    return layer, heads


def text_module(model):
    """The object holding the text weights: the model itself (CLIP, TextTransformer) or model.text."""
    if all(hasattr(model, a) for a in ("transformer", "token_embedding", "positional_embedding", "ln_final")):
        return model
    text = getattr(model, "text", None)
    if text is not None and all(hasattr(text, a) for a in ("transformer", "token_embedding", "positional_embedding")):
        return text
    raise TypeError(f"model must be an open_clip CLIP, CustomTextCLIP or TextTransformer with a causal transformer "
                    f"text tower, got {type(model).__name__}")


def resolve(model) -> TextTower:
    """Read the text tower of `model` (no copies: the tensors are the model's parameters)."""
    text = text_module(model)
    if getattr(text, "cls_emb", None) is not None:
        raise TypeError("text towers with an appended CLS embedding (CoCa) pool the last token after a "
                        "non-causal CLS: not supported")
    if getattr(text, "attn_mask", None) is None:
        raise TypeError("the text tower has no causal attention mask (no_causal_mask=True): truncation "
                        "and prefix sharing would not be exact")
    pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    eos_id = getattr(text, "text_eos_id", None) if hasattr(text, "text_pool_type") else getattr(text, "eos_id", None)
    resblocks = text.transformer.resblocks
    built = [_layer(b, i) for i, b in enumerate(resblocks)]
    heads = {h for _, h in built}
    if len(heads) != 1:
        raise TypeError(f"text blocks disagree on the number of heads: {sorted(heads)}")
    proj = text.text_projection
    if proj is None:
        proj_w, proj_b = None, None
    elif isinstance(proj, torch.nn.Linear):
        proj_w, proj_b = proj.weight.t(), proj.bias
    else:
        proj_w, proj_b = proj, None
    return TextTower(
        token_embedding=text.token_embedding.weight,
        positional_embedding=text.positional_embedding,
        layers=[layer for layer, _ in built],
        heads=heads.pop(),
        ln_final=_norm(text.ln_final, "ln_final"),
        projection=proj_w,
        projection_bias=proj_b,
        pool_type=pool_type,
        eos_id=eos_id,
        dtype=text.transformer.get_cast_dtype(),
    )


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 3W] -> three [..., H, d] views."""
    *lead, three_w = qkv.shape
    q, k, v = qkv.view(*lead, 3, heads, three_w // (3 * heads)).unbind(-3)
    return q, k, v


def causal_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain causal self-attention of [N, L, 3W] projections through torch SDPA -> [N, L, W]."""
    n, length, _ = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in split_heads(qkv, heads))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(n, length, -1)


def dense_forward(tower: TextTower, x: torch.Tensor) -> torch.Tensor:
    """Run all blocks on [N, L, W] (causal); returns the final hidden states (before ln_final)."""
    for layer in tower.layers:
        x = layer.finish(x, causal_attention(layer.qkv(x), tower.heads))
    return x


# ---------------------------------------------------------------------------------------------
# Prefix-shared forward
# ---------------------------------------------------------------------------------------------
@dataclass
class PackedLayout:
    """Where each of the N = G*K suffix sequences lives in the packed token matrix.

    Sequence n = g*K + k (group g, class k) owns rows seq_start[n] .. seq_start[n] + seq_len[n]
    (no padding); its pooled (EOT) token is row seq_start[n] + pool_len[n] - 1, the last of them in
    eager (positions after it never reach it: the tower is causal).
    """
    groups: int
    classes: int
    prefix_len: int
    max_len: int
    seq_start: torch.Tensor  # [N] int64
    seq_len: torch.Tensor  # [N] int64
    seq_group: torch.Tensor  # [N] int64
    token_src: torch.Tensor  # [T] row of the flattened suffix input
    token_pos: torch.Tensor  # [T] absolute position (for the positional embedding)
    pool_len: torch.Tensor  # [N] the pooled (EOT) token of sequence n is its row pool_len[n] - 1
    host_len: tuple  # seq_len on the host

    @property
    def sequences(self) -> int:
        return self.seq_len.numel()

    @property
    def tokens(self) -> int:
        return self.token_src.numel()

    @staticmethod
    def build(groups: int, host_lengths: tuple, lengths: torch.Tensor, prefix_len: int, src_width: int,
              suffix_per_group: bool) -> "PackedLayout":
        """Sequences of `host_lengths` tokens (host ints: the sizes of the layout, static while
        torch.compile traces), each pooled at its own length `lengths` [K] (a device tensor: the same
        values, or under torch.compile possibly smaller ones). src_width: positions per sequence in
        the suffix input (token_src indexes it flattened)."""
        k = len(host_lengths)
        dev = lengths.device
        # eager: the lengths tensor itself (no host->device copy); traced: the host sizes, constants
        sized = torch.tensor(host_lengths, dtype=torch.long, device=dev) if compiling() else lengths.long()
        seq_len = sized.repeat(groups)
        seq_start = torch.cumsum(seq_len, 0) - seq_len
        n, total = seq_len.numel(), sum(host_lengths) * groups
        seq_of = torch.repeat_interleave(torch.arange(n, device=dev), seq_len, output_size=total)  # packed order
        pos_of = torch.arange(total, device=dev) - seq_start[seq_of]
        src_seq = seq_of if suffix_per_group else seq_of % k
        return PackedLayout(groups, k, prefix_len, max(host_lengths), seq_start, seq_len, torch.arange(n, device=dev) // k,
                            src_seq * src_width + pos_of, pos_of + prefix_len, lengths.long().repeat(groups),
                            tuple(host_lengths) * groups)

    def chunks(self, chunk_size: Optional[int]):
        """(first sequence, end sequence, first row, end row) of each chunk of sequences."""
        n = self.sequences
        size = n if not chunk_size else chunk_size
        ends = list(itertools.accumulate(self.host_len))
        for n0 in range(0, n, size):
            n1 = min(n, n0 + size)
            yield n0, n1, (ends[n0 - 1] if n0 else 0), ends[n1 - 1]


@dataclass
class Ops:
    """The three differentiable prompt ops of one backend (dgkernels.prompt.ops.bound), with the
    reference's signatures."""
    name: str
    assemble: Callable
    prefix_attention: Callable
    eot_head: Callable


def prefix_stack(tower: TextTower, xp: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the G prefixes [G, Lp, W] through the blocks; keys/values [G, Lp, H, d] of every layer."""
    kv = []
    last = len(tower.layers) - 1
    for i, layer in enumerate(tower.layers):
        qkv = layer.qkv(xp)
        _, k, v = split_heads(qkv, tower.heads)
        kv.append((k, v))
        if i < last:  # the last layer's prefix outputs are never read
            xp = layer.finish(xp, causal_attention(qkv, tower.heads))
    return kv


def suffix_stack(tower: TextTower, ops: Ops, layout: PackedLayout, n0: int, n1: int, row0: int,
                 xs: torch.Tensor, kv_flat: tuple, normalize: bool) -> torch.Tensor:
    """Suffix sequences n0..n1 (packed rows xs [Tc, W]) through the blocks and the pooled head."""
    seq_start = layout.seq_start[n0:n1] - row0
    seq_len = layout.seq_len[n0:n1]
    seq_group = layout.seq_group[n0:n1]
    tc = xs.shape[0]
    dim = tower.width // tower.heads
    scale = dim ** -0.5
    for i, layer in enumerate(tower.layers):
        q, k, v = split_heads(layer.qkv(xs), tower.heads)
        a = ops.prefix_attention(q, k, v, kv_flat[2 * i], kv_flat[2 * i + 1], seq_start, seq_len,
                                           seq_group, layout.max_len, scale)
        xs = layer.finish(xs, a.reshape(tc, tower.width))
    rows = seq_start + layout.pool_len[n0:n1] - 1
    ln = tower.ln_final
    return ops.eot_head(xs, rows, ln.weight, ln.bias, ln.eps, tower.projection, tower.projection_bias, normalize)
