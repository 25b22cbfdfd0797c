"""Fused per-row label-smoothed cross-entropy over a float32 logit tile (value, and the logit
gradient written over the tile), used by domain_cross_entropy and the wide-feature cosine path."""
from __future__ import annotations

import triton
import triton.language as tl

from ..._triton_signature import CompileSpec
from ..._triton_signature import signature

ROW_BLOCK_K = 256


@triton.jit
def _ce_rows_kernel(z_ptr, tgt_ptr, g_ptr, per_ptr, dot_ptr, K, stride_z, ls,
                    HAS_GRAD: tl.constexpr, HAS_DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of label-smoothed cross-entropy over BLOCK_K chunks with an online log-sum-exp.
    HAS_GRAD: z is overwritten by g * (softmax - ls/K - (1 - ls) onehot); target < 0: ignored row."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(tgt_ptr + row)
    zrow = z_ptr + row * stride_z
    offs0 = tl.arange(0, BLOCK_K)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    zsum = tl.zeros((), dtype=tl.float32)
    zt = tl.zeros((), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + offs0
        mask = offs < K
        v = tl.load(zrow + offs, mask=mask, other=float("-inf"))
        nm = tl.maximum(m, tl.max(v, 0))
        s = s * tl.exp(m - nm) + tl.sum(tl.where(mask, tl.exp(v - nm), 0.0), 0)
        zsum += tl.sum(tl.where(mask, v, 0.0), 0)
        # the target logit is picked out of the chunk already read: a separate load of z[t] after
        # the loop could see another thread's pass-2 overwrite (no barrier orders the two)
        zt += tl.sum(tl.where(offs == t, v, 0.0), 0)
        m = nm
    lse = m + tl.log(s)
    valid = t >= 0
    smooth = ls / K
    tl.store(per_ptr + row, tl.where(valid, lse - (1.0 - ls) * zt - smooth * zsum, 0.0))
    if HAS_GRAD:
        gr = tl.where(valid, tl.load(g_ptr + row), 0.0)
        d = tl.zeros((), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + offs0
            mask = offs < K
            v = tl.load(zrow + offs, mask=mask, other=0.0)
            dz = gr * (tl.exp(v - lse) - smooth - tl.where(offs == t, 1.0 - ls, 0.0))
            dz = tl.where(mask, dz, 0.0)
            d += tl.sum(dz * v, 0)
            tl.store(zrow + offs, dz, mask=mask)
        if HAS_DOT:
            tl.store(dot_ptr + row, d)


def ce_rows(z, tgt, g, ls, per, dot=None):
    R, K = z.shape
    if R == 0:
        return
    _ce_rows_kernel[(R,)](z, tgt, g if g is not None else per, per, dot if dot is not None else per, K, z.stride(0),
                          float(ls), HAS_GRAD=g is not None, HAS_DOT=dot is not None, BLOCK_K=ROW_BLOCK_K,
                          num_warps=4)


SPECS = [CompileSpec(f"_ce_rows_kernel[grad={g},dot={d}]", _ce_rows_kernel,
                     signature(_ce_rows_kernel, z_ptr="*fp32", tgt_ptr="*i64", g_ptr="*fp32", per_ptr="*fp32",
                               dot_ptr="*fp32", ls="fp32"),
                     dict(HAS_GRAD=g, HAS_DOT=d, BLOCK_K=ROW_BLOCK_K), num_warps=4)
         for g, d in ((False, False), (True, False), (True, True))]
