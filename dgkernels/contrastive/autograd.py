"""One autograd.Function for the fused log-sum-exp primitive of every non-reference backend.

Forward keeps only lse_r [N] (and lse_c [M]); backward recomputes the similarity tiles
(FlashAttention style) given the upstream weights w_r = dL/dlse_r, w_c = dL/dlse_c:
    G_ij = w_r_i softmax_row(S)_ij + w_c_j softmax_col(S)_ij,
    dQ = scale G K,  dK = scale G^T Q,  dL/dscale = sum_ij G_ij q_i.k_j,
all from the backend's `lse_forward` / `lse_backward` (memory O(N + M) beyond inputs and grads;
the triton backend's dQ/dK accumulators are fp32 [N, D] / [M, D], the size of the gradients).
The scale goes to the backend as the 0-d tensor it is, on the inputs' device: the kernels read it
there, so a learnable CUDA logit scale costs no device->host copy (a stream sync) per call.
"""
from __future__ import annotations

import torch


class FusedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, exclude_diag, want_cols, impl):
        lse_r, lse_c = impl.lse_forward(q, k, scale.detach(), exclude_diag, want_cols)
        ctx.save_for_backward(q, k, scale, lse_r, lse_c if want_cols else None)
        ctx.impl, ctx.exclude_diag, ctx.want_cols = impl, exclude_diag, want_cols
        if not want_cols:
            ctx.mark_non_differentiable(lse_c)
        return lse_r, lse_c

    @staticmethod
    def backward(ctx, g_r, g_c):
        q, k, scale, lse_r, lse_c = ctx.saved_tensors
        acc = lse_r.dtype
        w_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(acc).contiguous()
        w_c = None
        if ctx.want_cols:
            w_c = torch.zeros_like(lse_c) if g_c is None else g_c.to(acc).contiguous()
        dq, dk, ds = ctx.impl.lse_backward(q, k, scale.detach(), ctx.exclude_diag, lse_r, lse_c, w_r, w_c)
        dscale = None
        if ctx.needs_input_grad[2]:
            dscale = ds.reshape(scale.shape).to(scale.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dscale, None, None, None


def fused_lse(q, k, scale, exclude_diag: bool, want_cols: bool, impl):
    """scale: a tensor (possibly requiring grad) holding one value. Returns (lse_r, lse_c|None)."""
    lse_r, lse_c = FusedLSE.apply(q, k, scale, exclude_diag, want_cols, impl)
    return lse_r, (lse_c if want_cols else None)
