"""The head primitives as custom ops (torch.ops.dgkernels.<name>), for every backend but the reference.

Primitives (each backend implements them under these names; a backward returns the gradients of
the first three inputs and, for the losses, the per-sample losses again, so it doubles as a fused
forward + backward; per-sample values are float32, float64 for float64 inputs):
  domain_fanout(x, w, b) -> logits [B, D, K]          domain_fanout_backward(g, x, w, has_bias)
  domain_cross_entropy_rows(x, w, b, domain, target, all_heads, ls) -> [B]
  head_agreement_rows(x, w, b, kind) -> [B]
  mapper_project_rows(x, w, b, domain, residual, normalize) -> (out, norm)
  cosine_cross_entropy_rows(x, c, scale, target, normalize, ls, ignore_index) -> [B]
  <loss>_rows_backward(rows, <args>) -> (g0, g1, g2, per_sample);  mapper_project_rows_backward(g,
  x, w, domain, out, norm, residual, normalize) -> (gx, gw, gb)
Nothing of size [B, D, K] or [B, K] is kept for a backward. A reduced loss that needs a gradient
runs `<loss>_fused` instead: the upstream weights (1/n or 1 per sample) are known in the forward,
so the forward runs the backward primitive once (Liger's fused linear cross-entropy trick) and the
backward only scales the stored gradients; otherwise the forward computes per-sample losses and
the backward recomputes the logits.
"""
from __future__ import annotations

import torch

from .._primitives import define
from .._validate import acc_dtype

KINDS = {"kl": 0, "sym_kl": 1}


def _per(x):
    return x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype))


def _grads3(x, w, *_):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[:-1])


def _present(inputs, n=3):
    return [t is not None for t in inputs[:n]]


# ---- domain_fanout ------------------------------------------------------------------------------
fanout_backward = define("domain_fanout_backward",
                         "(Tensor g, Tensor x, Tensor w, bool has_bias, str backend) -> (Tensor, Tensor, Tensor)",
                         lambda g, x, w, has_bias, backend: _grads3(x, w))


def _fanout_setup(ctx, inputs, output):
    x, w, b, backend = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias, ctx.backend = b is not None, backend


def _fanout_backward(ctx, g):
    x, w = ctx.saved_tensors
    gx, gw, gb = fanout_backward(g.contiguous(), x, w, ctx.has_bias, ctx.backend)
    return gx, gw, (gb if ctx.has_bias else None), None


domain_fanout = define("domain_fanout", "(Tensor x, Tensor w, Tensor? b, str backend) -> Tensor",
                       lambda x, w, b, backend: x.new_empty((x.shape[0], w.shape[0], w.shape[1])),
                       backward=_fanout_backward, setup_context=_fanout_setup)


# ---- the three losses: <name>_rows, <name>_rows_backward, <name>_fused ----------------------------
class _Loss:
    def __init__(self, name, args_schema, count, grad_fakes):
        self.count = count
        self.backward = define(f"{name}_rows_backward",
                               f"(Tensor rows, {args_schema}, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
                               lambda rows, *a: (*grad_fakes(*a[:3]), _per(a[0])))
        self.rows = define(f"{name}_rows", f"({args_schema}, str backend) -> Tensor", lambda *a: _per(a[0]),
                           backward=self._rows_backward, setup_context=self._rows_setup)
        self.fused = define(f"{name}_fused",
                            f"({args_schema}, str reduction, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
                            lambda *a: (a[0].new_empty((), dtype=acc_dtype(a[0].dtype)), *grad_fakes(*a[:3])),
                            backward=self._fused_backward, setup_context=self._fused_setup,
                            compute=self._fused_impl)

    def _fused_impl(self, *a):
        *args, reduction, backend = a
        count = self.count(args)
        ones = torch.ones(args[0].shape[0], dtype=acc_dtype(args[0].dtype), device=args[0].device)
        rows = ones / count if reduction == "mean" else ones
        *grads, per = self.backward(rows, *args, backend)
        loss = per.sum() / count if reduction == "mean" else per.sum()
        return (loss, *grads)

    @staticmethod
    def _fused_setup(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])
        ctx.present, ctx.n_inputs = _present(inputs), len(inputs)

    @staticmethod
    def _fused_backward(ctx, g, *_):
        grads = [(g * t).to(t.dtype) if ok else None for t, ok in zip(ctx.saved_tensors, ctx.present)]
        return (*grads, *([None] * (ctx.n_inputs - 3)))

    @staticmethod
    def _rows_setup(ctx, inputs, output):
        ctx.save_for_backward(*[a if isinstance(a, torch.Tensor) else None for a in inputs])
        ctx.plain = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.present = _present(inputs)

    def _rows_backward(self, ctx, g):
        args = [p if p is not None else t for p, t in zip(ctx.plain, ctx.saved_tensors)]
        grads = self.backward(g.contiguous(), *args)[:3]
        return (*[gr if ok else None for gr, ok in zip(grads, ctx.present)], *([None] * (len(args) - 3)))

    def __call__(self, args, reduction, backend):
        """The reduced ('mean' | 'sum') or per-sample ('none') loss over the backend's primitives."""
        if reduction != "none" and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in args[:3]):
            return self.fused(*args, reduction, backend)[0]
        per = self.rows(*args, backend)
        if reduction == "mean":
            return per.sum() / self.count(args)
        return per.sum() if reduction == "sum" else per


def _rows(args):
    return args[0].shape[0]


domain_cross_entropy = _Loss(
    "domain_cross_entropy", "Tensor x, Tensor w, Tensor? b, Tensor? domain, Tensor target, bool all_heads, float ls",
    _rows, _grads3)
head_agreement = _Loss("head_agreement", "Tensor x, Tensor w, Tensor? b, int kind", _rows, _grads3)
cosine_cross_entropy = _Loss(
    "cosine_cross_entropy",
    "Tensor x, Tensor c, Tensor scale, Tensor target, bool normalize, float ls, int ignore_index",
    lambda args: (args[3] != args[6]).sum(),
    lambda x, c, s: (x.new_empty(x.shape), c.new_empty(c.shape), s.new_empty(s.shape)))


# ---- mapper_project -------------------------------------------------------------------------------
mapper_backward = define(
    "mapper_project_rows_backward", "(Tensor g, Tensor x, Tensor w, Tensor? domain, Tensor out, Tensor norm, "
    "bool residual, bool normalize, str backend) -> (Tensor, Tensor, Tensor)",
    lambda g, x, w, *rest: _grads3(x, w))


def _mapper_setup(ctx, inputs, output):
    x, w, b, domain, residual, normalize, backend = inputs
    ctx.save_for_backward(x, w, domain, *output)
    ctx.args = (residual, normalize, backend, b is not None)


def _mapper_backward(ctx, g, _gnorm):
    x, w, domain, out, norm = ctx.saved_tensors
    residual, normalize, backend, has_bias = ctx.args
    gx, gw, gb = mapper_backward(g.contiguous(), x, w, domain, out, norm, residual, normalize, backend)
    return gx, gw, (gb if has_bias else None), None, None, None, None


mapper_project = define(
    "mapper_project_rows", "(Tensor x, Tensor w, Tensor? b, Tensor? domain, bool residual, bool normalize, "
    "str backend) -> (Tensor, Tensor)",
    lambda x, w, b, d, r, n, backend: (x.new_empty((x.shape[0], w.shape[-2])),
                                       x.new_empty((x.shape[0] if n else 0,), dtype=acc_dtype(x.dtype))),
    backward=_mapper_backward, setup_context=_mapper_setup)

PRIMITIVES = ("domain_fanout", "domain_fanout_backward", "domain_cross_entropy_rows",
              "domain_cross_entropy_rows_backward", "head_agreement_rows", "head_agreement_rows_backward",
              "mapper_project_rows", "mapper_project_rows_backward", "cosine_cross_entropy_rows",
              "cosine_cross_entropy_rows_backward")
# the launchers' own names in the triton modules
TRITON_NAMES = tuple(zip(PRIMITIVES, ("fanout_forward", "fanout_backward", "dce_forward", "dce_backward",
                                      "agree_forward", "agree_backward", "mapper_forward", "mapper_backward",
                                      "cosce_forward", "cosce_backward")))
