"""One autograd.Function per head op, calling the selected backend's forward/backward primitives.

A backend implementation object (dgkernels.heads.compiled, dgkernels.heads.triton) provides
  fanout_forward(x, w, b) -> logits                     fanout_backward(g, x, w, has_bias) -> (gx, gw, gb)
  dce_forward(x, w, b, domain, target, all_heads, ls) -> per_sample
  dce_backward(g, x, w, b, domain, target, all_heads, ls) -> (gx, gw, gb, per_sample)
  agree_forward(x, w, b, kind) -> per_sample             agree_backward(g, x, w, b, kind) -> (gx, gw, gb, per_sample)
  mapper_forward(x, w, b, domain, residual, normalize) -> (out, norm)
  mapper_backward(g, x, w, domain, out, norm, residual, normalize) -> (gx, gw, gb)
  cosce_forward(x, c, scale, target, normalize, ls, ignore_index) -> per_sample
  cosce_backward(g, x, c, scale, target, normalize, ls, ignore_index) -> (gx, gc, gscale, per_sample)
g is the per-sample upstream gradient; the *_backward primitives recompute the logits and return
the per-sample losses too (so they double as a fused forward+backward). Per-sample losses are
float32 (float64 for float64 inputs). Nothing of size [B, D, K] or [B, K] is kept for the backward.
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


class _FusedLoss(torch.autograd.Function):
    """Shared scheme of the three losses (domain CE, head agreement, cosine CE).

    For reduction 'mean'/'sum' under autograd the per-sample upstream weights are known in the
    forward (1/n or 1), so the forward runs the fused forward+backward kernel once (Liger's fused
    linear cross-entropy trick): the backward only scales the stored gradients by the incoming
    scalar, and the logits are built once instead of twice. Otherwise (reduction 'none', or no
    gradient wanted) the forward computes the losses only and the backward recomputes the logits.
    Subclasses define `_forward(impl, args)`, `_backward(impl, g_rows, args)` and `_count(args)`.
    """

    @classmethod
    def _run(cls, ctx, impl, args, reduction, precompute):
        ctx.impl, ctx.reduction, ctx.precompute = impl, reduction, precompute
        B = args[0].shape[0]
        count = cls._count(args)
        if precompute:
            ones = torch.ones(B, dtype=_acc(args[0]), device=args[0].device)
            rows = ones / count if reduction == "mean" else ones
            *grads, per = cls._backward(impl, rows, args)
            ctx.save_for_backward(*grads)
        else:
            per = cls._forward(impl, args)
            ctx.save_for_backward(*[a if isinstance(a, torch.Tensor) else None for a in args])
            ctx.plain = [None if isinstance(a, torch.Tensor) else a for a in args]
        if reduction == "mean":
            return per.sum() / count
        return per.sum() if reduction == "sum" else per

    @classmethod
    def _grads(cls, ctx, g):
        if ctx.precompute:
            return [None if t is None else (g * t).to(t.dtype) for t in ctx.saved_tensors]
        saved = ctx.saved_tensors
        args = [p if p is not None else t for p, t in zip(ctx.plain, saved)]
        B = args[0].shape[0]
        if ctx.reduction == "none":
            rows = g.contiguous()
        else:
            rows = g.expand(B).contiguous()
            if ctx.reduction == "mean":
                rows = rows / cls._count(args)
        return list(cls._backward(ctx.impl, rows, args)[:-1])


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class DomainCrossEntropy(_FusedLoss):
    @staticmethod
    def _count(args):
        return args[0].shape[0]

    @staticmethod
    def _forward(impl, a):
        return impl.dce_forward(*a)

    @staticmethod
    def _backward(impl, rows, a):
        return impl.dce_backward(rows, *a)

    @staticmethod
    def forward(ctx, impl, x, w, b, domain, target, all_heads, label_smoothing, reduction, precompute):
        return DomainCrossEntropy._run(ctx, impl, (x, w, b, domain, target, all_heads, label_smoothing),
                                       reduction, precompute)

    @staticmethod
    def backward(ctx, g):
        gx, gw, gb = DomainCrossEntropy._grads(ctx, g)
        n = ctx.needs_input_grad
        return None, _opt(gx, n[1]), _opt(gw, n[2]), _opt(gb, n[3]), None, None, None, None, None, None


class HeadAgreement(_FusedLoss):
    @staticmethod
    def _count(args):
        return args[0].shape[0]

    @staticmethod
    def _forward(impl, a):
        return impl.agree_forward(*a)

    @staticmethod
    def _backward(impl, rows, a):
        return impl.agree_backward(rows, *a)

    @staticmethod
    def forward(ctx, impl, x, w, b, kind, reduction, precompute):
        return HeadAgreement._run(ctx, impl, (x, w, b, kind), reduction, precompute)

    @staticmethod
    def backward(ctx, g):
        gx, gw, gb = HeadAgreement._grads(ctx, g)
        n = ctx.needs_input_grad
        return None, _opt(gx, n[1]), _opt(gw, n[2]), _opt(gb, n[3]), None, None, None


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


class CosineCrossEntropy(_FusedLoss):
    @staticmethod
    def _count(args):
        target, ignore_index = args[3], args[6]
        return (target != ignore_index).sum()

    @staticmethod
    def _forward(impl, a):
        return impl.cosce_forward(*a)

    @staticmethod
    def _backward(impl, rows, a):
        return impl.cosce_backward(rows, *a)

    @staticmethod
    def forward(ctx, impl, x, c, scale, target, normalize, label_smoothing, ignore_index, reduction, precompute):
        ctx.scale_meta = (scale.shape, scale.dtype)
        return CosineCrossEntropy._run(ctx, impl, (x, c, scale, target, normalize, label_smoothing, ignore_index),
                                       reduction, precompute)

    @staticmethod
    def backward(ctx, g):
        gx, gc, gs = CosineCrossEntropy._grads(ctx, g)
        n = ctx.needs_input_grad
        gs = gs.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1]) if n[3] else None
        return None, _opt(gx, n[1]), _opt(gc, n[2]), gs, None, None, None, None, None, None
