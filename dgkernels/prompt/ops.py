"""The prompt primitives as custom ops (torch.ops.dgkernels.<name>), for every backend but the reference.

  assemble_tokens(src, src_index, pos, pos_index, dtype) -> [T, W]: src rows + positional rows
      (backward: index_add_rows(grad, index, rows) -> float32 [rows, W], once per input)
  prefix_attention(q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale) -> (out, lse)
      (backward: prefix_attention_backward(grad_out, q, k, v, kp, vp, out, lse, seq_start, seq_len,
      seq_group, max_len, scale) -> (dq, dk, dv, dkp, dvp))
  eot_head(x, rows, ln_w, ln_b, eps, proj, proj_b, normalize) -> (out, y, z, mean, rstd)
      (backward: eot_head_backward(grad_out, x, rows, ln_w, eps, proj, y, z, mean, rstd, normalize)
      -> (dx, dln_w, dln_b, dproj, dproj_b))
The reference (.reference) implements the three forward primitives in differentiable PyTorch and
returns their first output. `bound(name)` gives the three differentiable ops of one backend with
the reference's signatures, as the encoders call them.
"""
from __future__ import annotations

import torch

from .._primitives import define
from .._validate import acc_dtype
from . import reference
from .text_tower import Ops

PRIMITIVES = ("assemble_tokens", "index_add_rows", "prefix_attention", "prefix_attention_backward", "eot_head",
              "eot_head_backward")
TRITON_NAMES = tuple(zip(PRIMITIVES, ("assemble_fwd", "index_add_rows", "attention_fwd", "attention_bwd",
                                      "head_fwd", "head_bwd")))


def _cast(t, like):
    return None if like is None else t.to(like.dtype)


# ---- assemble_tokens ----------------------------------------------------------------------------
index_add_rows = define("index_add_rows", "(Tensor grad, Tensor index, SymInt rows, str backend) -> Tensor",
                        lambda grad, index, rows, backend: grad.new_empty((rows, grad.shape[1]),
                                                                          dtype=acc_dtype(grad.dtype)))


def _assemble_setup(ctx, inputs, output):
    src, src_index, pos, pos_index, dtype, backend = inputs
    ctx.save_for_backward(src_index, pos_index)
    ctx.meta = (src.shape[0], src.dtype, pos.shape[0], pos.dtype, backend)


def _assemble_backward(ctx, grad):
    src_index, pos_index = ctx.saved_tensors
    src_rows, src_dtype, pos_rows, pos_dtype, backend = ctx.meta
    need = ctx.needs_input_grad
    gsrc = index_add_rows(grad, src_index, src_rows, backend).to(src_dtype) if need[0] else None
    gpos = index_add_rows(grad, pos_index, pos_rows, backend).to(pos_dtype) if need[2] else None
    return gsrc, None, gpos, None, None, None


assemble_tokens = define(
    "assemble_tokens", "(Tensor src, Tensor src_index, Tensor pos, Tensor pos_index, ScalarType dtype, str backend) "
    "-> Tensor",
    lambda src, src_index, pos, pos_index, dtype, backend: src.new_empty((src_index.shape[0], src.shape[1]),
                                                                         dtype=dtype),
    backward=_assemble_backward, setup_context=_assemble_setup)


# ---- prefix_attention ---------------------------------------------------------------------------
_ATTN_ARGS = "Tensor seq_start, Tensor seq_len, Tensor seq_group, int max_len, float scale, str backend"
attention_backward = define(
    "prefix_attention_backward", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor kp, Tensor vp, Tensor out, "
    f"Tensor lse, {_ATTN_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    lambda g, q, k, v, kp, vp, *rest: (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
                                       kp.new_empty(kp.shape), kp.new_empty(kp.shape)))


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output, *inputs[5:8])
    ctx.args = inputs[8:]


def _attention_backward(ctx, grad, _glse):
    q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group = ctx.saved_tensors
    grads = attention_backward(grad.contiguous(), q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group, *ctx.args)
    return (*grads, None, None, None, None, None, None)


prefix_attention = define(
    "prefix_attention", f"(Tensor q, Tensor k, Tensor v, Tensor kp, Tensor vp, {_ATTN_ARGS}) -> (Tensor, Tensor)",
    lambda q, *rest: (q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)),
    backward=_attention_backward, setup_context=_attention_setup)


# ---- eot_head -----------------------------------------------------------------------------------
def _head_fake(x, rows, ln_weight, ln_bias, eps, proj, proj_bias, normalize, backend):
    n, w = rows.shape[0], x.shape[1]
    e = w if proj is None else proj.shape[1]
    acc = acc_dtype(x.dtype)
    return (x.new_empty((n, e)), x.new_empty((n, w), dtype=acc), x.new_empty((n, e), dtype=acc),
            x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc))


def _head_backward_fake(grad_out, x, rows, ln_weight, eps, proj, y, z, mean, rstd, normalize, backend):
    w, acc = x.shape[1], acc_dtype(x.dtype)
    dproj = x.new_empty((0,), dtype=acc) if proj is None else x.new_empty(proj.shape, dtype=acc)
    return (x.new_empty(x.shape), x.new_empty((w,), dtype=acc), x.new_empty((w,), dtype=acc), dproj,
            x.new_empty((z.shape[1],), dtype=acc))


head_backward = define(
    "eot_head_backward", "(Tensor grad_out, Tensor x, Tensor rows, Tensor? ln_weight, float eps, Tensor? proj, "
    "Tensor y, Tensor z, Tensor mean, Tensor rstd, bool normalize, str backend) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor)", _head_backward_fake)


def _head_setup(ctx, inputs, output):
    x, rows, ln_w, ln_b, eps, proj, proj_b, normalize, backend = inputs
    ctx.save_for_backward(x, rows, ln_w, ln_b, proj, proj_b, *output[1:])
    ctx.args = (eps, normalize, backend)


def _head_backward(ctx, grad, *_):
    x, rows, ln_w, ln_b, proj, proj_b, y, z, mean, rstd = ctx.saved_tensors
    eps, normalize, backend = ctx.args
    dx, dlw, dlb, dproj, dpb = head_backward(grad.contiguous(), x, rows, ln_w, eps, proj, y, z, mean, rstd, normalize,
                                             backend)
    return (dx, None, _cast(dlw, ln_w), _cast(dlb, ln_b), None, _cast(dproj, proj), _cast(dpb, proj_b), None, None)


eot_head = define(
    "eot_head", "(Tensor x, Tensor rows, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor? proj, "
    "Tensor? proj_bias, bool normalize, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _head_fake,
    backward=_head_backward, setup_context=_head_setup)


def bound(name: str) -> Ops:
    """The three differentiable prompt ops of backend `name`, with the reference's signatures."""
    if name == "reference":
        return Ops(name, reference.assemble_tokens, reference.prefix_attention, reference.eot_head)
    return Ops(name,
               lambda src, src_index, pos, pos_index, dtype: assemble_tokens(src, src_index, pos, pos_index, dtype, name),
               lambda q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale: prefix_attention(
                   q, k, v, kp, vp, seq_start, seq_len, seq_group, int(max_len), float(scale), name)[0],
               lambda x, rows, ln_w, ln_b, eps, proj, proj_b, normalize: eot_head(
                   x, rows, ln_w, ln_b, float(eps), proj, proj_b, bool(normalize), name)[0])
