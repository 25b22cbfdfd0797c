"""The contrastive primitive as custom ops: dgkernels::contrastive_lse and its backward.

contrastive_lse(q, k, scale, exclude_diag, want_cols, backend) -> (lse_r [N], lse_c [M] or [0]):
the row (and column) log-sum-exp of S = scale * Q K^T in float32 (float64 for float64 inputs).
Forward keeps only lse_r and lse_c; the backward recomputes the similarity tiles (FlashAttention
style) given the upstream weights w_r = dL/dlse_r, w_c = dL/dlse_c:
    G_ij = w_r_i softmax_row(S)_ij + w_c_j softmax_col(S)_ij,
    dQ = scale G K,  dK = scale G^T Q,  dL/dscale = sum_ij G_ij q_i.k_j
(memory O(N + M) beyond inputs and gradients). The scale is a 0-d tensor on the inputs' device,
read there by the kernels: a learnable CUDA logit scale costs no device->host copy per call.
"""
from __future__ import annotations

import torch

from .._primitives import define
from .._validate import acc_dtype

LSE = "contrastive_lse"
LSE_BACKWARD = "contrastive_lse_backward"
PRIMITIVES = (LSE, LSE_BACKWARD)


def _lse_fake(q, k, scale, exclude_diag, want_cols, backend):
    acc = acc_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=acc), k.new_empty((k.shape[0] if want_cols else 0,), dtype=acc)


def _backward_fake(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c, backend):
    acc = acc_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc), q.new_empty((), dtype=acc)


lse_backward = define(LSE_BACKWARD, "(Tensor q, Tensor k, Tensor scale, bool exclude_diag, Tensor lse_r, "
                      "Tensor? lse_c, Tensor w_r, Tensor? w_c, str backend) -> (Tensor, Tensor, Tensor)",
                      _backward_fake)


def _setup(ctx, inputs, output):
    q, k, scale, exclude_diag, want_cols, backend = inputs
    ctx.save_for_backward(q, k, scale, *output)
    ctx.args = (exclude_diag, want_cols, backend)


def _backward(ctx, g_r, g_c):
    q, k, scale, lse_r, lse_c = ctx.saved_tensors
    exclude_diag, want_cols, backend = ctx.args
    acc = lse_r.dtype
    w_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(acc).contiguous()
    w_c = None
    if want_cols:
        w_c = torch.zeros_like(lse_c) if g_c is None else g_c.to(acc).contiguous()
    dq, dk, ds = lse_backward(q, k, scale, exclude_diag, lse_r, lse_c if want_cols else None, w_r, w_c, backend)
    return dq.to(q.dtype), dk.to(k.dtype), ds.reshape(scale.shape).to(scale.dtype), None, None, None


lse = define(LSE, "(Tensor q, Tensor k, Tensor scale, bool exclude_diag, bool want_cols, str backend) "
             "-> (Tensor, Tensor)", _lse_fake, backward=_backward, setup_context=_setup)
