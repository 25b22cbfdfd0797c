"""One autograd.Function per head op, calling the selected backend's forward/backward primitives.

A backend implementation object (dgkernels.heads.cpp, dgkernels.heads.triton) provides
  fanout_forward(x, w, b) -> logits                     fanout_backward(g, x, w, has_bias) -> (gx, gw, gb)
  dce_forward(x, w, b, domain, target, all_heads, ls) -> (per_sample, lse)
  dce_backward(g, x, w, b, domain, target, lse, all_heads, ls) -> (gx, gw, gb)
  agree_forward(x, w, b, kind) -> per_sample             agree_backward(g, x, w, b, kind) -> (gx, gw, gb)
  mapper_forward(x, w, b, domain, residual, normalize) -> (out, norm)
  mapper_backward(g, x, w, domain, out, norm, residual, normalize) -> (gx, gw, gb)
  cosce_forward(x, c, scale, target, normalize, ls, ignore_index) -> (per_sample, lse)
  cosce_backward(g, x, c, scale, target, lse, normalize, ls, ignore_index) -> (gx, gc, gscale)
Per-sample losses come back in float32 (float64 for float64 inputs); api.py reduces them.
Saved state is O(B) (log-sum-exp per row, norms) besides the inputs: the [B, D, K] and [B, K]
logits are recomputed in the backward.
"""
from __future__ import annotations

import torch

KINDS = {"kl": 0, "sym_kl": 1}


def _opt(t, needed):
    return t if needed else None


class DomainFanout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, w, b):
        ctx.impl = impl
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return impl.fanout_forward(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx, gw, gb = ctx.impl.fanout_backward(g.contiguous(), x, w, ctx.has_bias)
        n = ctx.needs_input_grad
        return None, _opt(gx, n[1]), _opt(gw, n[2]), _opt(gb, n[3] and ctx.has_bias)


class DomainCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, w, b, domain, target, all_heads, label_smoothing):
        per, lse = impl.dce_forward(x, w, b, domain, target, all_heads, label_smoothing)
        ctx.impl, ctx.all_heads, ctx.ls = impl, all_heads, label_smoothing
        ctx.save_for_backward(x, w, b, domain, target, lse)
        return per

    @staticmethod
    def backward(ctx, g):
        x, w, b, domain, target, lse = ctx.saved_tensors
        gx, gw, gb = ctx.impl.dce_backward(g.contiguous(), x, w, b, domain, target, lse, ctx.all_heads, ctx.ls)
        n = ctx.needs_input_grad
        return None, _opt(gx, n[1]), _opt(gw, n[2]), _opt(gb, n[3]), None, None, None, None


class HeadAgreement(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, w, b, kind):
        ctx.impl, ctx.kind = impl, kind
        ctx.save_for_backward(x, w, b)
        return impl.agree_forward(x, w, b, kind)

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        gx, gw, gb = ctx.impl.agree_backward(g.contiguous(), x, w, b, ctx.kind)
        n = ctx.needs_input_grad
        return None, _opt(gx, n[1]), _opt(gw, n[2]), _opt(gb, n[3]), None


class MapperProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, w, b, domain, residual, normalize):
        out, norm = impl.mapper_forward(x, w, b, domain, residual, normalize)
        ctx.impl, ctx.residual, ctx.normalize, ctx.has_bias = impl, residual, normalize, b is not None
        ctx.save_for_backward(x, w, domain, out, norm)
        ctx.mark_non_differentiable(norm)
        return out, norm

    @staticmethod
    def backward(ctx, g, _gnorm):
        x, w, domain, out, norm = ctx.saved_tensors
        gx, gw, gb = ctx.impl.mapper_backward(g.contiguous(), x, w, domain, out, norm, ctx.residual, ctx.normalize)
        n = ctx.needs_input_grad
        return None, _opt(gx, n[1]), _opt(gw, n[2]), _opt(gb, n[3] and ctx.has_bias), None, None, None


class CosineCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, c, scale, target, normalize, label_smoothing, ignore_index):
        per, lse = impl.cosce_forward(x, c, scale, target, normalize, label_smoothing, ignore_index)
        ctx.impl, ctx.normalize, ctx.ls, ctx.ii = impl, normalize, label_smoothing, ignore_index
        ctx.save_for_backward(x, c, scale, target, lse)
        return per

    @staticmethod
    def backward(ctx, g):
        x, c, scale, target, lse = ctx.saved_tensors
        gx, gc, gs = ctx.impl.cosce_backward(g.contiguous(), x, c, scale, target, lse, ctx.normalize, ctx.ls, ctx.ii)
        n = ctx.needs_input_grad
        gs = gs.reshape(scale.shape).to(scale.dtype) if n[3] else None
        return None, _opt(gx, n[1]), _opt(gc, n[2]), gs, None, None, None, None
