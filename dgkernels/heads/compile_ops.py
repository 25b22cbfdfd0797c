"""The torch.compile path of the head ops: each backend primitive of dgkernels.heads.autograd
behind a custom op (opaque to dynamo and AOTAutograd, with fake kernels for the shapes).

The eager autograd.Functions take the backend's implementation object as an argument, which
dynamo cannot trace. Here the backend is resolved at trace time to its NAME (a graph constant)
and looked up again when the op runs, so each op computes exactly what the eager path computes:
the same primitives with the same arguments, and the same scheme for the losses (the fused
forward+backward when a reduced loss needs a gradient, else per-sample losses and a recomputing
backward; see autograd._FusedLoss).
"""
from __future__ import annotations

import torch

from .. import _dispatch

_LIB = torch.library.Library("dgkernels_compile", "FRAGMENT")
_NS = "dgkernels_compile::"


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per(x):
    return x.new_empty((x.shape[0],), dtype=_acc(x))


def _grads3(x, w, b=None):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[:-1])


def _define(name, schema, impl, fake):
    _LIB.define(f"{name}{schema}")
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(_NS + name, fake, lib=_LIB)
    return getattr(torch.ops.dgkernels_compile, name).default


# ---------------------------------------------------------------------------------------------
# domain_fanout
# ---------------------------------------------------------------------------------------------
_fanout = _define("heads_fanout", "(Tensor x, Tensor w, Tensor? b, str backend) -> Tensor",
                  lambda x, w, b, backend: _dispatch.impl_of("domain_fanout", backend).fanout_forward(x, w, b),
                  lambda x, w, b, backend: x.new_empty((x.shape[0], w.shape[0], w.shape[1])))
_fanout_bwd = _define(
    "heads_fanout_bwd", "(Tensor g, Tensor x, Tensor w, bool has_bias, str backend) -> (Tensor, Tensor, Tensor)",
    lambda g, x, w, has_bias, backend: tuple(
        _dispatch.impl_of("domain_fanout", backend).fanout_backward(g, x, w, has_bias)),
    lambda g, x, w, has_bias, backend: _grads3(x, w))


def _fanout_setup(ctx, inputs, output):
    x, w, b, backend = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias, ctx.backend = b is not None, backend


def _fanout_backward(ctx, g):
    x, w = ctx.saved_tensors
    gx, gw, gb = _fanout_bwd(g.contiguous(), x, w, ctx.has_bias, ctx.backend)
    return gx, gw, (gb if ctx.has_bias else None), None


torch.library.register_autograd(_NS + "heads_fanout", _fanout_backward, setup_context=_fanout_setup, lib=_LIB)


def domain_fanout(x, w, b, backend):
    return _fanout(x, w, b, backend)


# ---------------------------------------------------------------------------------------------
# The three losses: <loss>_fwd (per-sample), <loss>_bwd (recompute), <loss>_fused (fwd + bwd)
# ---------------------------------------------------------------------------------------------
class _Loss:
    def __init__(self, name, op, args_schema, fwd, bwd, count, grad_fakes):
        self.op, self.count, self.bwd_name = op, count, bwd
        self.n_args = args_schema.count(",") + 1
        impl = lambda backend: _dispatch.impl_of(op, backend)  # noqa: E731
        self.fwd = _define(f"{name}_fwd", f"({args_schema}, str backend) -> Tensor",
                           lambda *a: getattr(impl(a[-1]), fwd)(*a[:-1]), lambda *a: _per(a[0]))
        self.bwd = _define(f"{name}_bwd", f"(Tensor rows, {args_schema}, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
                           lambda rows, *a: tuple(getattr(impl(a[-1]), bwd)(rows, *a[:-1])),
                           lambda rows, *a: (*grad_fakes(*a[:3]), _per(a[0])))
        self.fused = _define(f"{name}_fused", f"({args_schema}, str reduction, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
                             self._fused_impl, lambda *a: (a[0].new_empty((), dtype=_acc(a[0])), *grad_fakes(*a[:3])))
        torch.library.register_autograd(_NS + f"{name}_fwd", self._fwd_backward, setup_context=self._fwd_setup, lib=_LIB)
        torch.library.register_autograd(_NS + f"{name}_fused", self._fused_backward, setup_context=self._fused_setup,
                                        lib=_LIB)

    def _fused_impl(self, *a):
        *args, reduction, backend = a
        count = self.count(args)
        ones = torch.ones(args[0].shape[0], dtype=_acc(args[0]), device=args[0].device)
        rows = ones / count if reduction == "mean" else ones
        *grads, per = getattr(_dispatch.impl_of(self.op, backend), self.bwd_name)(rows, *args)
        loss = per.sum() / count if reduction == "mean" else per.sum()
        return (loss, *grads)

    @staticmethod
    def _fused_setup(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])
        ctx.present = [t is not None for t in inputs[:3]]
        ctx.n_inputs = len(inputs)

    @staticmethod
    def _fused_backward(ctx, g, *_):
        grads = [(g * t).to(t.dtype) if ok else None for t, ok in zip(ctx.saved_tensors, ctx.present)]
        return (*grads, *([None] * (ctx.n_inputs - 3)))

    @staticmethod
    def _fwd_setup(ctx, inputs, output):
        tensors = [a if isinstance(a, torch.Tensor) else None for a in inputs]
        ctx.save_for_backward(*tensors)
        ctx.plain = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.present = [a is not None for a in inputs[:3]]

    def _fwd_backward(self, ctx, g):
        args = [p if p is not None else t for p, t in zip(ctx.plain, ctx.saved_tensors)]
        grads = self.bwd(g.contiguous(), *args)[:3]
        return (*[gr if ok else None for gr, ok in zip(grads, ctx.present)], *([None] * (len(args) - 3)))

    def __call__(self, args, reduction, precompute, backend):
        if precompute:
            return self.fused(*args, reduction, backend)[0]
        per = self.fwd(*args, backend)
        if reduction == "mean":
            return per.sum() / self.count(args)
        return per.sum() if reduction == "sum" else per


_rows = lambda args: args[0].shape[0]  # noqa: E731

dce = _Loss("heads_dce", "domain_cross_entropy",
            "Tensor x, Tensor w, Tensor? b, Tensor? domain, Tensor target, bool all_heads, float ls",
            "dce_forward", "dce_backward", _rows, _grads3)
agree = _Loss("heads_agree", "head_agreement", "Tensor x, Tensor w, Tensor? b, int kind",
              "agree_forward", "agree_backward", _rows, _grads3)
cosce = _Loss("heads_cosce", "cosine_cross_entropy",
              "Tensor x, Tensor c, Tensor scale, Tensor target, bool normalize, float ls, int ignore_index",
              "cosce_forward", "cosce_backward", lambda args: (args[3] != args[6]).sum(),
              lambda x, c, s: (x.new_empty(x.shape), c.new_empty(c.shape), s.new_empty(s.shape)))


# ---------------------------------------------------------------------------------------------
# mapper_project
# ---------------------------------------------------------------------------------------------
_mapper = _define(
    "heads_mapper", "(Tensor x, Tensor w, Tensor? b, Tensor? domain, bool residual, bool normalize, str backend)"
    " -> (Tensor, Tensor)",
    lambda x, w, b, d, r, n, backend: tuple(_dispatch.impl_of("mapper_project", backend).mapper_forward(x, w, b, d, r, n)),
    lambda x, w, b, d, r, n, backend: (x.new_empty((x.shape[0], w.shape[-2])),
                                       x.new_empty((x.shape[0] if n else 0,), dtype=_acc(x))))
_mapper_bwd = _define(
    "heads_mapper_bwd", "(Tensor g, Tensor x, Tensor w, Tensor? domain, Tensor out, Tensor norm, bool residual, "
    "bool normalize, str backend) -> (Tensor, Tensor, Tensor)",
    lambda g, x, w, d, out, norm, r, n, backend: tuple(
        _dispatch.impl_of("mapper_project", backend).mapper_backward(g, x, w, d, out, norm, r, n)),
    lambda g, x, w, d, out, norm, r, n, backend: _grads3(x, w))


def _mapper_setup(ctx, inputs, output):
    x, w, b, domain, residual, normalize, backend = inputs
    out, norm = output
    ctx.save_for_backward(x, w, domain, out, norm)
    ctx.args = (residual, normalize, backend, b is not None)


def _mapper_backward(ctx, g, _gnorm):
    x, w, domain, out, norm = ctx.saved_tensors
    residual, normalize, backend, has_bias = ctx.args
    gx, gw, gb = _mapper_bwd(g.contiguous(), x, w, domain, out, norm, residual, normalize, backend)
    return gx, gw, (gb if has_bias else None), None, None, None, None


torch.library.register_autograd(_NS + "heads_mapper", _mapper_backward, setup_context=_mapper_setup, lib=_LIB)


def mapper_project(x, w, b, domain, residual, normalize, backend):
    return _mapper(x, w, b, domain, residual, normalize, backend)[0]
