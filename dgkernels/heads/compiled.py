"""The compiled backend (`dgkernels._C`, csrc/heads/): CPU kernels and, when built with CUDA, CUDA ones.

The same functions serve the "cpp" and "cuda" backends: torch.ops.dgkernels.* dispatches on the
tensors' device. Fake kernels let torch.compile trace the ops.
"""
from __future__ import annotations

import torch


def refusal(op: str, call) -> str:
    """csrc/heads runs every floating dtype (float64 in float64) and any size: logits exist only
    as row tiles, head_agreement's [D, K] rows included."""
    return ""


def _ops():
    return torch.ops.dgkernels


def fanout_forward(x, w, b):
    return _ops().heads_fanout(x, w, b)


def fanout_backward(g, x, w, has_bias):
    return _ops().heads_fanout_backward(g, x, w, has_bias)


def dce_forward(x, w, b, domain, target, all_heads, ls):
    return _ops().heads_dce_forward(x, w, b, domain, target, all_heads, ls)


def dce_backward(g, x, w, b, domain, target, all_heads, ls):
    return _ops().heads_dce_backward(g, x, w, b, domain, target, all_heads, ls)


def agree_forward(x, w, b, kind):
    return _ops().heads_agree_forward(x, w, b, kind)


def agree_backward(g, x, w, b, kind):
    return _ops().heads_agree_backward(g, x, w, b, kind)


def mapper_forward(x, w, b, domain, residual, normalize):
    return _ops().heads_mapper_forward(x, w, b, domain, residual, normalize)


def mapper_backward(g, x, w, domain, out, norm, residual, normalize):
    return _ops().heads_mapper_backward(g, x, w, domain, out, norm, residual, normalize)


def cosce_forward(x, c, scale, target, normalize, ls, ignore_index):
    return _ops().heads_cosce_forward(x, c, scale, target, normalize, ls, ignore_index)


def cosce_backward(g, x, c, scale, target, normalize, ls, ignore_index):
    return _ops().heads_cosce_backward(g, x, c, scale, target, normalize, ls, ignore_index)


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per(x):
    return x.new_empty((x.shape[0],), dtype=_acc(x))


def register_fakes():
    # A _C built before this family existed (stale in-place build) lacks its ops: nothing to register.
    if not hasattr(torch.ops.dgkernels, "heads_fanout"):
        return
    reg = torch.library.register_fake

    @reg("dgkernels::heads_fanout")
    def _(x, w, b):
        return x.new_empty((x.shape[0], w.shape[0], w.shape[1]))

    def _grads3(x, w):
        return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[:-1])

    @reg("dgkernels::heads_fanout_backward")
    def _(g, x, w, has_bias):
        return _grads3(x, w)

    @reg("dgkernels::heads_dce_forward")
    def _(x, w, b, domain, target, all_heads, ls):
        return x.new_empty((x.shape[0],), dtype=_acc(x))

    @reg("dgkernels::heads_dce_backward")
    def _(g, x, w, b, domain, target, all_heads, ls):
        return (*_grads3(x, w), _per(x))

    @reg("dgkernels::heads_agree_forward")
    def _(x, w, b, kind):
        return x.new_empty((x.shape[0],), dtype=_acc(x))

    @reg("dgkernels::heads_agree_backward")
    def _(g, x, w, b, kind):
        return (*_grads3(x, w), _per(x))

    @reg("dgkernels::heads_mapper_forward")
    def _(x, w, b, domain, residual, normalize):
        return x.new_empty((x.shape[0], w.shape[-2])), x.new_empty((x.shape[0] if normalize else 0,), dtype=_acc(x))

    @reg("dgkernels::heads_mapper_backward")
    def _(g, x, w, domain, out, norm, residual, normalize):
        return _grads3(x, w)

    @reg("dgkernels::heads_cosce_forward")
    def _(x, c, scale, target, normalize, ls, ignore_index):
        return _per(x)

    @reg("dgkernels::heads_cosce_backward")
    def _(g, x, c, scale, target, normalize, ls, ignore_index):
        return x.new_empty(x.shape), c.new_empty(c.shape), scale.new_empty(scale.shape), _per(x)
