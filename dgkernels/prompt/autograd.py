"""Autograd wiring of the prompt ops over a backend's forward/backward primitives.

A backend (cpp/cuda: torch.ops.dgkernels.*, triton: launchers) supplies `prims` with
    assemble(src, src_index, pos, pos_index, dtype) -> out
    index_add_rows(grad, index, rows) -> float32 [rows, W]
    attention(q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale) -> (out, lse)
    attention_backward(grad_out, q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group, max_len, scale)
        -> (dq, dk, dv, dkp, dvp)
    head(x, rows, ln_w, ln_b, eps, proj, proj_b, normalize) -> (out, y, z, mean, rstd)
    head_backward(grad_out, x, rows, ln_w, eps, proj, y, z, mean, rstd, normalize)
        -> (dx, dln_w, dln_b, dproj, dproj_b)
and `backend_ops(prims)` turns them into the three differentiable ops with the reference's
signatures (see reference.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.autograd import Function


class _Assemble(Function):
    @staticmethod
    def forward(ctx, src, src_index, pos, pos_index, dtype, prims):
        ctx.save_for_backward(src_index, pos_index)
        ctx.prims = prims
        ctx.meta = (src.shape[0], src.dtype, pos.shape[0], pos.dtype)
        return prims.assemble(src, src_index, pos, pos_index, dtype)

    @staticmethod
    def backward(ctx, grad):
        src_index, pos_index = ctx.saved_tensors
        src_rows, src_dtype, pos_rows, pos_dtype = ctx.meta
        gsrc = gpos = None
        if ctx.needs_input_grad[0]:
            gsrc = ctx.prims.index_add_rows(grad, src_index, src_rows).to(src_dtype)
        if ctx.needs_input_grad[2]:
            gpos = ctx.prims.index_add_rows(grad, pos_index, pos_rows).to(pos_dtype)
        return gsrc, None, gpos, None, None, None


class _PrefixAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale, prims):
        out, lse = prims.attention(q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale)
        ctx.save_for_backward(q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group)
        ctx.args = (max_len, scale)
        ctx.prims = prims
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group = ctx.saved_tensors
        dq, dk, dv, dkp, dvp = ctx.prims.attention_backward(grad.contiguous(), q, k, v, kp, vp, out, lse, seq_start,
                                                            seq_len, seq_group, *ctx.args)
        return dq, dk, dv, dkp, dvp, None, None, None, None, None, None


class _EotHead(Function):
    @staticmethod
    def forward(ctx, x, rows, ln_w, ln_b, eps, proj, proj_b, normalize, prims):
        out, y, z, mean, rstd = prims.head(x, rows, ln_w, ln_b, eps, proj, proj_b, normalize)
        ctx.save_for_backward(x, rows, ln_w, proj, y, z, mean, rstd)
        ctx.args = (eps, normalize)
        ctx.prims = prims
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (ln_w, ln_b, proj, proj_b))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rows, ln_w, proj, y, z, mean, rstd = ctx.saved_tensors
        eps, normalize = ctx.args
        dx, dlw, dlb, dproj, dpb = ctx.prims.head_backward(grad.contiguous(), x, rows, ln_w, eps, proj, y, z, mean,
                                                           rstd, normalize)
        need = ctx.needs_input_grad
        cast = lambda t, i: t.to(ctx.dtypes[i]) if ctx.dtypes[i] is not None else None  # noqa: E731
        return (dx if need[0] else None, None,
                cast(dlw, 0) if need[2] else None, cast(dlb, 1) if need[3] else None, None,
                cast(dproj, 2) if need[5] else None, cast(dpb, 3) if need[6] else None, None, None)


def backend_ops(prims) -> SimpleNamespace:
    """The three differentiable prompt ops over `prims` (same signatures as the reference)."""

    def assemble(src, src_index, pos, pos_index, dtype):
        return _Assemble.apply(src, src_index, pos, pos_index, dtype, prims)

    def prefix_attention(q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale):
        return _PrefixAttention.apply(q, k, v, kp, vp, seq_start, seq_len, seq_group, int(max_len), float(scale), prims)

    def eot_head(x, rows, ln_weight, ln_bias, eps, proj, proj_bias, normalize):
        return _EotHead.apply(x, rows, ln_weight, ln_bias, float(eps), proj, proj_bias, bool(normalize), prims)

    return SimpleNamespace(assemble=assemble, prefix_attention=prefix_attention, eot_head=eot_head)
