"""Public prompt-encoding functions: validation, backend choice, truncation and prefix sharing."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.utils.checkpoint as torch_checkpoint

from .. import _dispatch
from .._validate import _device_assert, check_same_dtype, check_tensor, compiling
from . import ops, reference
from .text_tower import Ops, PackedLayout, TextTower, dense_forward, prefix_stack, resolve, suffix_stack

OP_ASSEMBLE, OP_ATTENTION, OP_HEAD = "assemble_tokens", "prefix_attention", "eot_head"
_OPS = (OP_ASSEMBLE, OP_ATTENTION, OP_HEAD)


def call_facts(tower: TextTower, device: torch.device, src_dtype: torch.dtype, *, prefix_len: Optional[int] = None,
               suffix_len: Optional[int] = None) -> _dispatch.CallFacts:
    """What the backends decide on: the activation dtype (first) and the embeddings' dtype, the
    attention head size, and (encode_prompts) the prefix length and the longest suffix."""
    sizes = {"head_dim": tower.width // tower.heads}
    if prefix_len is not None:
        sizes["prefix_len"] = prefix_len
    if suffix_len is not None:
        sizes["suffix_len"] = suffix_len
    return _dispatch.call_facts(device, (tower.dtype, src_dtype), **sizes)


def prompt_ops(device: torch.device, backend: Optional[str], call: _dispatch.CallFacts) -> Ops:
    """The ops of the one backend that runs all three prompt primitives for `call` (the backend is
    a constant while torch.compile traces: the graph calls its custom ops)."""
    return ops.bound(_dispatch.select_name(_OPS, device, backend, call))


def _check_model_device(tower: TextTower, device: torch.device, what: str) -> None:
    if tower.device != device:
        raise ValueError(f"{what} is on {device} but the model's text tower is on {tower.device}")


# ---------------------------------------------------------------------------------------------
# encode_text
# ---------------------------------------------------------------------------------------------
def encode_text(model, tokens: torch.Tensor, normalize: bool = False, *, backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for open_clip `model.encode_text(tokens, normalize)` (CLIP, CustomTextCLIP or a
    TextTransformer with the standard causal tower), truncated to the longest pooled position
    (backend="reference": all L positions, the plain computation).

    tokens: [N, L] integer token ids, L <= the model's context length. Returns [N, E] in the
    model's cast dtype. The text tower is causal and pools one token per row (the EOT for the
    default 'argmax' pooling), so the positions after the last pooled one are never computed.

    Under torch.compile the truncation length would be data (the longest EOT), so a compiled
    call runs all L positions (exact: nothing after the pooled token reaches it) through the
    selected backend's ops; pass `tokens[:, :n]` to bound the work. The token-range check is then
    a device-side assert.
    """
    tower = resolve(model)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of token ids, got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be [N, L] with N >= 1, got shape {tuple(tokens.shape)}")
    if not 1 <= tokens.shape[1] <= tower.context_length:
        raise ValueError(f"tokens has {tokens.shape[1]} positions; the model's context length is {tower.context_length}")
    _check_model_device(tower, tokens.device, "tokens")
    vocab = tower.token_embedding.shape[0]
    fns = prompt_ops(tokens.device, backend, call_facts(tower, tokens.device, tower.token_embedding.dtype))
    if compiling():
        _device_assert((tokens >= 0) & (tokens < vocab), f"tokens values must lie in [0, {vocab})")
    else:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens values must lie in [0, {vocab}), got min {lo}, max {hi}")

    n = tokens.shape[0]
    pooled = tower.pool_index(tokens)
    # The reference backend is the plain computation: every one of the L positions, as open_clip.
    length = tokens.shape[1] if fns.name == "reference" or compiling() else int(pooled.max()) + 1
    dev = tokens.device
    ids = tokens[:, :length].reshape(-1).long()
    pos_index = torch.arange(length, device=dev).repeat(n)
    x = fns.assemble(tower.token_embedding, ids, tower.positional_embedding, pos_index, tower.dtype)
    x = dense_forward(tower, x.view(n, length, tower.width))
    rows = torch.arange(n, device=dev) * length + pooled
    ln = tower.ln_final
    return fns.eot_head(x.reshape(n * length, tower.width), rows, ln.weight, ln.bias, ln.eps,
                             tower.projection, tower.projection_bias, bool(normalize))


# ---------------------------------------------------------------------------------------------
# encode_prompts
# ---------------------------------------------------------------------------------------------
def _as_lengths(suffix_lengths, k: int, max_len: int, device: torch.device) -> tuple[torch.Tensor, Optional[tuple]]:
    """(lengths as int64 on `device`, the same as a tuple of host ints when known there: always in
    eager; under torch.compile only for lengths given as Python ints, a tensor's values being data)."""
    if isinstance(suffix_lengths, (list, tuple)) and compiling():  # host values: checked here, static in the trace
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in suffix_lengths):
            raise TypeError("suffix_lengths given as a list must hold ints under torch.compile")
        if len(suffix_lengths) != k:
            raise ValueError(f"suffix_lengths must be [K] = [{k}] (one length per class), got {len(suffix_lengths)} entries")
        lo, hi = min(suffix_lengths), max(suffix_lengths)
        if lo < 1 or hi > max_len:
            raise ValueError(f"suffix_lengths must lie in [1, {max_len}] (suffix holds {max_len} positions), got min {lo}, max {hi}")
        return torch.tensor(list(suffix_lengths), dtype=torch.long, device=device), tuple(suffix_lengths)
    if isinstance(suffix_lengths, (list, tuple)):
        suffix_lengths = torch.tensor(suffix_lengths, dtype=torch.long)
    if not isinstance(suffix_lengths, torch.Tensor):
        raise TypeError(f"suffix_lengths must be a tensor (or list) of ints, got {type(suffix_lengths).__name__}")
    if suffix_lengths.is_floating_point() or suffix_lengths.dtype == torch.bool or suffix_lengths.is_complex():
        raise TypeError(f"suffix_lengths must be an integer tensor, got {suffix_lengths.dtype}")
    if suffix_lengths.dim() != 1 or suffix_lengths.shape[0] != k:
        raise ValueError(f"suffix_lengths must be [K] = [{k}] (one length per class), got shape {tuple(suffix_lengths.shape)}")
    if compiling():
        _device_assert((suffix_lengths >= 1) & (suffix_lengths <= max_len),
                       f"suffix_lengths must lie in [1, {max_len}] (suffix holds {max_len} positions)")
        return suffix_lengths.to(device=device, dtype=torch.long), None
    host = tuple(suffix_lengths.tolist())  # the one host read of an eager encode (the layout's sizes)
    lo, hi = min(host), max(host)
    if lo < 1 or hi > max_len:
        raise ValueError(f"suffix_lengths must lie in [1, {max_len}] (suffix holds {max_len} positions), got min {lo}, max {hi}")
    return suffix_lengths.to(device=device, dtype=torch.long), host


def validate_prompts(tower: TextTower, prefix, suffix, suffix_lengths,
                     chunk_size) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Checks of encode_prompts; returns (suffix as [K, Ls, W] or [G, K, Ls, W], lengths int64,
    the lengths the packed layout is built for, as host ints: the lengths themselves when known on
    the host, else (under torch.compile, a lengths tensor) min(Ls, context - Lp) for every class,
    a static bound of each length: exact, since nothing after a prompt's EOT reaches it).

    Under torch.compile, checks on the values of a lengths tensor are device-side asserts."""
    check_tensor("prefix", prefix, dims=3)
    check_tensor("suffix", suffix, dims=(3, 4))
    check_same_dtype(prefix=prefix, suffix=suffix)
    if prefix.device != suffix.device:
        raise ValueError(f"prefix is on {prefix.device} but suffix is on {suffix.device}")
    _check_model_device(tower, prefix.device, "prefix")
    g, lp, w = prefix.shape
    if w != tower.width or suffix.shape[-1] != tower.width:
        raise ValueError(f"prefix width {w} and suffix width {suffix.shape[-1]} must equal the text width "
                         f"{tower.width} (prefix {tuple(prefix.shape)}, suffix {tuple(suffix.shape)})")
    if g < 1 or lp < 1:
        raise ValueError(f"prefix must be [G, Lp, W] with G >= 1 and Lp >= 1 (at least the SOS token), got {tuple(prefix.shape)}")
    if suffix.dim() == 4 and suffix.shape[0] != g:
        raise ValueError(f"suffix [G, K, Ls, W] must have G = {g} groups like prefix, got {tuple(suffix.shape)}")
    k, ls = suffix.shape[-3], suffix.shape[-2]
    if k < 1 or ls < 1:
        raise ValueError(f"suffix must hold K >= 1 classes of Ls >= 1 tokens, got shape {tuple(suffix.shape)}")
    lengths, host = _as_lengths(suffix_lengths, k, ls, prefix.device)
    longest = None if host is None else max(host)
    too_long = (f"prefix length {lp} + longest suffix length {{}} exceeds the model's context length "
                f"{tower.context_length}")
    if longest is None:  # compiling, lengths are data
        _device_assert(lengths <= tower.context_length - lp, too_long.format("(max of suffix_lengths)"))
    elif lp + longest > tower.context_length:
        raise ValueError(too_long.format(f"{longest} = {lp + longest}"))
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return suffix, lengths, host or (min(ls, tower.context_length - lp),) * k


def encode_prompts_tower(tower: TextTower, prefix: torch.Tensor, suffix: torch.Tensor, lengths: torch.Tensor,
                         normalize: bool, chunk_size: Optional[int], checkpoint: bool, ops: Ops,
                         host_lengths: tuple) -> torch.Tensor:
    """encode_prompts on validated inputs (validate_prompts) with a resolved tower and the ops of
    one backend (used by PromptEncoder)."""
    if ops.name == "reference":
        return reference.full_context_encode(tower, prefix, suffix, lengths, normalize, chunk_size, checkpoint)
    g, lp, w = prefix.shape
    k, ls = suffix.shape[-3], suffix.shape[-2]
    dev = prefix.device
    pos = tower.positional_embedding
    layout = PackedLayout.build(g, host_lengths, lengths, lp, ls, suffix.dim() == 4)
    xs = ops.assemble(suffix.reshape(-1, w), layout.token_src, pos, layout.token_pos, tower.dtype)
    xp = ops.assemble(prefix.reshape(g * lp, w), torch.arange(g * lp, device=dev), pos,
                      torch.arange(lp, device=dev).repeat(g), tower.dtype).view(g, lp, w)
    kv_flat = tuple(t for pair in prefix_stack(tower, xp) for t in pair)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    outs = []
    for n0, n1, r0, r1 in layout.chunks(chunk_size):
        run = functools.partial(_chunk, tower, ops, layout, n0, n1, r0, bool(normalize))
        if use_ckpt:
            outs.append(torch_checkpoint.checkpoint(run, xs[r0:r1], *kv_flat, use_reentrant=False))
        else:
            outs.append(run(xs[r0:r1], *kv_flat))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.view(g, k, -1)


def _chunk(tower, ops, layout, n0, n1, r0, normalize, xs, *kv_flat):
    return suffix_stack(tower, ops, layout, n0, n1, r0, xs, kv_flat, normalize)


def encode_prompts(model, prefix: torch.Tensor, suffix: torch.Tensor,
                   suffix_lengths: Union[torch.Tensor, Sequence[int]], normalize: bool = True, *,
                   chunk_size: Optional[int] = None, checkpoint: bool = False,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Encode G x K learned prompts with a shared prefix per group; returns [G, K, E].

    prefix: [G, Lp, W] token embeddings of each group's shared prefix (SOS + context vectors;
        G = 1 shared context, G = B instance-conditioned, G = D domain-conditioned).
    suffix: [K, Ls, W] (the same for every group) or [G, K, Ls, W]: class-name token embeddings up
        to and including EOT (class-specific context: Lp = 1 and the context inside the suffix).
    suffix_lengths: [K] ints: suffix tokens of class k up to and including its EOT (EOT at
        absolute position Lp + suffix_lengths[k] - 1); Lp + max length <= context length.
    normalize: L2-normalise the features.
    chunk_size: run the G*K suffix sequences in chunks of this many (bounds transient memory;
        with checkpoint=True also the saved activations: one chunk's at a time).
    checkpoint: recompute each chunk's suffix activations in backward instead of keeping them.
    backend: "triton" | "cuda" | "cpp" | "reference" | None (automatic). "reference" is the plain
        computation the others are tested against: every prompt at the model's full context
        length, no prefix sharing (as CoOp's TextEncoder); chunk_size and checkpoint still apply.

    Positional embeddings are added inside. Exact (up to floating-point rounding) against the
    naive 77-token encoder: causal attention lets the K suffixes read the prefix's keys/values
    computed once per group, and positions after each EOT are never computed. Gradients flow to
    prefix, suffix and any text-tower weight that requires grad.

    Under torch.compile the same backend's custom ops run (the packed layout is sized on the host
    while tracing): with the lengths as a Python list/tuple (checked while tracing) the layout is
    the eager one; with a lengths tensor (its values then checked by device-side asserts) every
    class is packed at min(Ls, context - Lp) tokens and pooled at its own EOT, exact as well
    (causal tower, EOT pooling).
    """
    tower = resolve(model)
    suffix, lengths, host = validate_prompts(tower, prefix, suffix, suffix_lengths, chunk_size)
    call = call_facts(tower, prefix.device, prefix.dtype, prefix_len=prefix.shape[1], suffix_len=max(host))
    ops = prompt_ops(prefix.device, backend, call)
    return encode_prompts_tower(tower, prefix, suffix, lengths, normalize, chunk_size, checkpoint, ops, host)
