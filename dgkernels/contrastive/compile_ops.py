"""The torch.compile path of the fused log-sum-exp: the same backend primitives behind two custom
ops, which dynamo and AOTAutograd treat as opaque calls with known output shapes.

Why not FusedLSE under compile: its forward turns the scale into a Python float (a graph break)
and reaches the backend through an implementation object (a LazyModule importing on first use),
neither of which dynamo can trace. Here the backend is resolved at trace time to its NAME (a graph
constant) and looked up again when the op runs; the scale stays a tensor in the graph and goes to
the kernels as one (they read it from device memory: no host sync per call). The value each op
computes is that of the eager path: the same `lse_forward` / `lse_backward` with the same arguments.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("dgkernels_compile::contrastive_lse_fwd", mutates_args=())
def lse_fwd(q: Tensor, k: Tensor, scale: Tensor, exclude_diag: bool, want_cols: bool, op: str,
            backend: str) -> tuple[Tensor, Tensor]:
    impl = _dispatch.impl_of(op, backend)
    lse_r, lse_c = impl.lse_forward(q, k, scale, exclude_diag, want_cols)
    if not want_cols:
        lse_c = lse_r.new_empty(0)
    return lse_r, lse_c


@lse_fwd.register_fake
def _(q, k, scale, exclude_diag, want_cols, op, backend):
    acc = _acc(q.dtype)
    return q.new_empty((q.shape[0],), dtype=acc), k.new_empty((k.shape[0] if want_cols else 0,), dtype=acc)


@torch.library.custom_op("dgkernels_compile::contrastive_lse_bwd", mutates_args=())
def lse_bwd(q: Tensor, k: Tensor, scale: Tensor, exclude_diag: bool, lse_r: Tensor, lse_c: Optional[Tensor],
            w_r: Tensor, w_c: Optional[Tensor], op: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _dispatch.impl_of(op, backend)
    dq, dk, ds = impl.lse_backward(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c)
    return dq, dk, ds.reshape(())


@lse_bwd.register_fake
def _(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c, op, backend):
    acc = _acc(q.dtype)
    return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc), q.new_empty((), dtype=acc)


def _setup(ctx, inputs, output):
    q, k, scale, exclude_diag, want_cols, op, backend = inputs
    lse_r, lse_c = output
    ctx.save_for_backward(q, k, scale, lse_r, lse_c)
    ctx.args = (exclude_diag, want_cols, op, backend)


def _backward(ctx, g_r, g_c):
    q, k, scale, lse_r, lse_c = ctx.saved_tensors
    exclude_diag, want_cols, op, backend = ctx.args
    acc = lse_r.dtype
    w_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(acc).contiguous()
    w_c = None
    if want_cols:
        w_c = torch.zeros_like(lse_c) if g_c is None else g_c.to(acc).contiguous()
    dq, dk, ds = lse_bwd(q, k, scale, exclude_diag, lse_r, lse_c if want_cols else None, w_r, w_c, op, backend)
    return dq.to(q.dtype), dk.to(k.dtype), ds.reshape(scale.shape).to(scale.dtype), None, None, None, None


lse_fwd.register_autograd(_backward, setup_context=_setup)


def fused_lse(q, k, scale, exclude_diag: bool, want_cols: bool, op: str, backend: str):
    lse_r, lse_c = lse_fwd(q, k, scale, exclude_diag, want_cols, op, backend)
    return lse_r, (lse_c if want_cols else None)
