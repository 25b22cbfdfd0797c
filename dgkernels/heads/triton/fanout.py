"""domain_fanout: every head on every sample, one GEMM with the heads stacked as D*K rows."""
from __future__ import annotations

from ._common import check_fp64
from .matmul import mm


def fanout_forward(x, w, b):
    check_fp64(x)
    B, F = x.shape
    D, K, _ = w.shape
    w2 = w.reshape(D * K, F)
    out = mm(x, w2.t(), bias=None if b is None else b.reshape(D * K).float().contiguous())
    return out.to(x.dtype).view(B, D, K)


def fanout_backward(g, x, w, has_bias):
    B, F = x.shape
    D, K, _ = w.shape
    g2 = g.reshape(B, D * K)
    gx = mm(g2, w.reshape(D * K, F))
    gw = mm(g2.t(), x)
    gb = g2.float().sum(0)
    return gx.to(x.dtype), gw.to(w.dtype).view(D, K, F), gb.to(w.dtype).view(D, K)
