"""Plain PyTorch: the reference backend of prompt encoding, and the naive CoOp-style encoder.

`full_context_encode` is what `encode_prompts(..., backend="reference")` runs: every prompt at the
model's full context length, no prefix sharing, no truncation (the plain computation, as CoOp's
TextEncoder does it). The three primitive references (assemble_tokens, prefix_attention, eot_head) are
differentiable PyTorch and the oracle the compiled and Triton kernels of those sub-ops are
tested against. `naive_encode_prompts` runs the same prompts through the model's own open_clip
modules: the independent oracle the whole optimised path must equal.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from .text_tower import Norm, TextTower, dense_forward, resolve, text_module


# ---------------------------------------------------------------------------------------------
# The primitives (dgkernels.prompt.ops: the fused backends return extra outputs for their backward)
# ---------------------------------------------------------------------------------------------
def assemble_tokens(src: torch.Tensor, src_index: torch.Tensor, pos: torch.Tensor, pos_index: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """out[t] = src[src_index[t]].to(dtype) + pos[pos_index[t]].to(dtype)   -> [T, W]."""
    return src.index_select(0, src_index).to(dtype) + pos.index_select(0, pos_index).to(dtype)


def token_coordinates(seq_start: torch.Tensor, seq_len: torch.Tensor, total: int):
    """(sequence, position) of each packed token row."""
    n = seq_len.numel()
    seq_of = torch.repeat_interleave(torch.arange(n, device=seq_len.device), seq_len, output_size=total)
    pos_of = torch.arange(total, device=seq_len.device) - seq_start[seq_of]
    return seq_of, pos_of


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
                     seq_start: torch.Tensor, seq_len: torch.Tensor, seq_group: torch.Tensor, max_len: int,
                     scale: float) -> torch.Tensor:
    """Shared-prefix causal attention over packed suffix tokens.

    q, k, v: [T, H, d] packed suffix tokens (sequence n owns rows seq_start[n] .. + seq_len[n]);
    kp, vp: [G, Lp, H, d] keys/values of the prefixes; sequence n reads prefix seq_group[n].
    Query t of sequence n attends to all Lp prefix positions and to its own positions <= t.
    """
    total, heads, dim = q.shape
    n = seq_len.numel()
    lp = kp.shape[1]
    seq_of, pos_of = token_coordinates(seq_start, seq_len, total)
    flat = seq_of * max_len + pos_of

    def pad(t):
        return t.new_zeros(n * max_len, heads, dim).index_copy(0, flat, t).view(n, max_len, heads, dim)

    keys = torch.cat([kp.index_select(0, seq_group), pad(k)], 1).transpose(1, 2)
    vals = torch.cat([vp.index_select(0, seq_group), pad(v)], 1).transpose(1, 2)
    allowed = torch.ones(max_len, lp + max_len, dtype=torch.bool, device=q.device)
    allowed[:, lp:] = torch.ones(max_len, max_len, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(pad(q).transpose(1, 2), keys, vals, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2).reshape(n * max_len, heads, dim).index_select(0, flat)


def eot_head(x: torch.Tensor, rows: torch.Tensor, ln_weight, ln_bias, eps: float, proj, proj_bias,
             normalize: bool) -> torch.Tensor:
    """Gather rows of x [T, W], ln_final (float32, cast back), projection, optional L2 norm."""
    y = Norm(ln_weight, ln_bias, eps)(x.index_select(0, rows))
    if proj is not None:
        y = y @ proj
        if proj_bias is not None:
            y = y + proj_bias
    return F.normalize(y, dim=-1) if normalize else y


# ---------------------------------------------------------------------------------------------
# The reference backend of encode_prompts
# ---------------------------------------------------------------------------------------------
def full_context_encode(tower: TextTower, prefix: torch.Tensor, suffix: torch.Tensor, lengths: torch.Tensor,
                        normalize: bool, chunk_size: Optional[int], checkpoint: bool) -> torch.Tensor:
    """Every [prefix | suffix] prompt padded to the context length and run densely -> [G, K, E].

    Inputs as validated by encode_prompts. Positions past the suffix tensor hold zeros (nothing
    after a prompt's EOT can reach its pooled token: the mask is causal). chunk_size bounds the
    prompts run at once; checkpoint recomputes each chunk's activations in backward.
    """
    g, lp, w = prefix.shape
    if suffix.dim() == 3:
        suffix = suffix.unsqueeze(0).expand(g, -1, -1, -1)
    k = suffix.shape[1]
    ctx = tower.context_length
    seqs = torch.cat([prefix.unsqueeze(1).expand(g, k, lp, w), suffix[:, :, :ctx - lp]], 2).reshape(g * k, -1, w)
    seqs = F.pad(seqs, (0, 0, 0, ctx - seqs.shape[1]))
    eot = (lp + lengths - 1).repeat(g)
    pos = tower.positional_embedding[:ctx].to(tower.dtype)
    ln = tower.ln_final

    def run(x, eot_pos):
        x = dense_forward(tower, x.to(tower.dtype) + pos)
        rows = torch.arange(x.shape[0], device=x.device) * ctx + eot_pos  # EOT rows of the flattened [n * ctx, W]
        return eot_head(x.reshape(-1, w), rows, ln.weight, ln.bias, ln.eps, tower.projection, tower.projection_bias,
                        bool(normalize))

    n = g * k
    step = n if chunk_size is None else chunk_size
    use_ckpt = checkpoint and torch.is_grad_enabled()
    outs = []
    for n0 in range(0, n, step):
        args = (seqs[n0:n0 + step], eot[n0:n0 + step])
        outs.append(torch_checkpoint.checkpoint(run, *args, use_reentrant=False) if use_ckpt else run(*args))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.view(g, k, -1)


# ---------------------------------------------------------------------------------------------
# The naive CoOp-style encoder (oracle and baseline)
# ---------------------------------------------------------------------------------------------
def naive_encode_prompts(model, prefix: torch.Tensor, suffix: torch.Tensor, suffix_lengths: torch.Tensor,
                         normalize: bool = True) -> torch.Tensor:
    """Every prompt assembled to the full context length and run through open_clip's own modules.

    prefix [G, Lp, W]; suffix [K, Ls, W] or [G, K, Ls, W]; suffix_lengths [K] (EOT at
    Lp + suffix_lengths[k] - 1). Positions after each suffix are zero embeddings (they cannot
    influence the pooled token: the mask is causal). Returns [G, K, E].
    """
    text = text_module(model)
    tower = resolve(model)
    g, lp, w = prefix.shape
    if suffix.dim() == 3:
        suffix = suffix.unsqueeze(0).expand(g, -1, -1, -1)
    k, ls = suffix.shape[1], suffix.shape[2]
    ctx = tower.context_length
    dtype = tower.dtype
    seqs = torch.cat([prefix.unsqueeze(1).expand(g, k, lp, w), suffix], 2).reshape(g * k, lp + ls, w)
    seqs = F.pad(seqs, (0, 0, 0, ctx - lp - ls))
    x = seqs.to(dtype) + text.positional_embedding.to(dtype)
    x = text.transformer(x, attn_mask=text.attn_mask)
    x = text.ln_final(x)
    eot = (lp + suffix_lengths.to(prefix.device).long() - 1).repeat(g)
    x = x[torch.arange(g * k, device=x.device), eot]
    proj = text.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    x = F.normalize(x, dim=-1) if normalize else x
    return x.view(g, k, -1)
