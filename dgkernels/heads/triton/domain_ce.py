"""domain_cross_entropy: each sample's cross-entropy under its own domain's head (or the mean over
all heads), logits in row tiles (matmul.mm) and the fused row kernel; gradient GEMMs from the tile."""
from __future__ import annotations

import torch

from ._common import check_fp64, groups, op_dtype, tile_rows
from .cross_entropy_rows import ce_rows
from .matmul import mm


def _dce(g, x, w, b, domain, target, all_heads, ls):
    check_fp64(x)
    B, F = x.shape
    D, K, _ = w.shape
    dev = x.device
    opd = op_dtype(x)
    xo, wo = x.to(opd), w.to(opd)
    bf = None if b is None else b.float().contiguous()
    tgt = target.long().contiguous()
    grad = g is not None
    per = torch.empty(B, dtype=torch.float32, device=dev)
    gw = torch.zeros(D * K, F, dtype=torch.float32, device=dev) if grad else None
    gb = torch.zeros(D * K, dtype=torch.float32, device=dev) if grad else None
    if all_heads or D == 1:
        w2 = wo.reshape(D * K, F)
        b2 = None if bf is None else bf.reshape(D * K)
        t_rep = tgt.repeat_interleave(D)
        g_rep = (g.float() / D).repeat_interleave(D) if grad else None
        gx = torch.empty(B, F, dtype=torch.float32, device=dev) if grad else None
        R = tile_rows(D * K, B)
        for r0 in range(0, B, R):
            n = min(R, B - r0)
            xb = xo[r0:r0 + n]
            z = mm(xb, w2.t(), bias=b2)
            per_rows = torch.empty(n * D, dtype=torch.float32, device=dev)
            ce_rows(z.view(n * D, K), t_rep[r0 * D:(r0 + n) * D], g_rep[r0 * D:(r0 + n) * D] if grad else None, ls,
                     per_rows)
            per[r0:r0 + n] = per_rows.view(n, D).mean(1)
            if grad:
                mm(z, w2, out=gx[r0:r0 + n])
                mm(z.t(), xb, out=gw, accumulate=True)
                gb += z.sum(0)
    else:
        order, off = groups(domain, D)
        xs, ts = xo.index_select(0, order), tgt.index_select(0, order)
        gs = g.float().index_select(0, order) if grad else None
        per_s = torch.empty(B, dtype=torch.float32, device=dev)
        gxs = torch.empty(B, F, dtype=torch.float32, device=dev) if grad else None
        gw3, gb2 = (gw.view(D, K, F), gb.view(D, K)) if grad else (None, None)
        R = tile_rows(K, B)
        for d in range(D):
            for r0 in range(off[d], off[d + 1], R):
                n = min(R, off[d + 1] - r0)
                xb = xs[r0:r0 + n]
                z = mm(xb, wo[d].t(), bias=None if bf is None else bf[d])
                ce_rows(z, ts[r0:r0 + n], gs[r0:r0 + n] if grad else None, ls, per_s[r0:r0 + n])
                if grad:
                    mm(z, wo[d], out=gxs[r0:r0 + n])
                    mm(z.t(), xb, out=gw3[d], accumulate=True)
                    gb2[d] += z.sum(0)
        per = torch.empty_like(per_s).index_copy_(0, order, per_s)
        gx = torch.empty_like(gxs).index_copy_(0, order, gxs) if grad else None
    if not grad:
        return per
    return gx.to(x.dtype), gw.view(D, K, F).to(w.dtype), gb.view(D, K).to(w.dtype), per


def dce_forward(x, w, b, domain, target, all_heads, ls):
    return _dce(None, x, w, b, domain, target, all_heads, ls)


def dce_backward(g, x, w, b, domain, target, all_heads, ls):
    return _dce(g, x, w, b, domain, target, all_heads, ls)
