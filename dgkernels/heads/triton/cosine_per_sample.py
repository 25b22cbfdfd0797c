"""cosine_cross_entropy with per-sample class embeddings c [B, K, E] (instance-conditioned prompts):
one program per sample streams its K x E block twice (online log-sum-exp, then the gradients), all
arithmetic in float32."""
from __future__ import annotations

import triton
import triton.language as tl

from ..._triton_signature import CompileSpec
from ..._triton_signature import signature
from ._common import row_block


@triton.jit
def _class_chunk(cb, x, rk, re, K, E, NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Classes rk of one sample (cb: its [K, E] block): the rows c in float32, their mask cm and
    kmask, norms nrm (0 without normalisation), divisors den = max(nrm, 1e-12) (1 without) and
    the cosines c.x / den."""
    kmask = rk < K
    cm = kmask[:, None] & (re[None, :] < E)
    c = tl.load(cb + rk[:, None] * E + re[None, :], mask=cm, other=0.0).to(tl.float32)
    dv = tl.sum(c * x[None, :], 1)
    if NORMALIZE:
        nrm = tl.sqrt(tl.sum(c * c, 1))
        den = tl.maximum(nrm, 1e-12)
    else:
        nrm = tl.zeros((BLOCK_K,), dtype=tl.float32)
        den = tl.full((BLOCK_K,), 1.0, tl.float32)
    return c, cm, kmask, nrm, den, dv / den


@triton.jit
def _cos_ps_kernel(x_ptr, c_ptr, tgt_ptr, g_ptr, per_ptr, dot_ptr, dx_ptr, gc_ptr, scale_ptr, K, E, ls,
                   NORMALIZE: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Cross-entropy of one sample over its own class embeddings c[b] [K, E] (x already normalised):
    pass 1 streams BLOCK_K classes at a time with an online log-sum-exp; pass 2 (HAS_GRAD) recomputes
    them and writes dL/dc[b] and dL/dx[b] (before x's normalisation)."""
    b = tl.program_id(0).to(tl.int64)
    re = tl.arange(0, BLOCK_E)
    rk0 = tl.arange(0, BLOCK_K)
    emask = re < E
    x = tl.load(x_ptr + b * E + re, mask=emask, other=0.0)
    sc = tl.load(scale_ptr)
    t = tl.load(tgt_ptr + b)
    cb = c_ptr + b * K * E
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    zsum = tl.zeros((), dtype=tl.float32)
    zt = tl.zeros((), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        _, _, kmask, _, _, cos = _class_chunk(cb, x, rk, re, K, E, NORMALIZE, BLOCK_K)
        z = tl.where(kmask, sc * cos, float("-inf"))
        nm = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - nm) + tl.sum(tl.where(kmask, tl.exp(z - nm), 0.0), 0)
        zsum += tl.sum(tl.where(kmask, z, 0.0), 0)
        zt += tl.sum(tl.where(rk == t, z, 0.0), 0)
        m = nm
    lse = m + tl.log(s)
    valid = t >= 0
    smooth = ls / K
    tl.store(per_ptr + b, tl.where(valid, lse - (1.0 - ls) * zt - smooth * zsum, 0.0))
    if HAS_GRAD:
        gr = tl.where(valid, tl.load(g_ptr + b), 0.0)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        d = tl.zeros((), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            c, cm, kmask, nrm, den, cos = _class_chunk(cb, x, rk, re, K, E, NORMALIZE, BLOCK_K)
            z = sc * cos
            dz = gr * (tl.exp(z - lse) - smooth - tl.where(rk == t, 1.0 - ls, 0.0))
            dz = tl.where(kmask, dz, 0.0)
            d += tl.sum(dz * z, 0)
            w = dz / den
            acc += tl.sum(w[:, None] * c, 0)
            if NORMALIZE:
                proj = tl.where(nrm > 1e-12, cos / den, 0.0)
            else:
                proj = tl.zeros((BLOCK_K,), dtype=tl.float32)
            gc = (sc * w)[:, None] * (x[None, :] - c * proj[:, None])
            tl.store(gc_ptr + b * K * E + rk[:, None] * E + re[None, :], gc, mask=cm)
        tl.store(dx_ptr + b * E + re, sc * acc, mask=emask)
        tl.store(dot_ptr + b, d)

def blocks(E):
    """(BLOCK_K, BLOCK_E, num_warps): a [BLOCK_K, E] class chunk of at most 2**14 elements (2**13
    from E = 2048 on), 8 warps from 4096 elements on. Each choice is what did not spill (ptxas -v,
    sm_90a) under both Triton 3.6 (the GPU machine's) and 3.8: 4 warps holding 128 elements each
    spilled, so did 4 warps over a 64 x 64 chunk and 8 warps over an 8 x 2048 one under 3.6, and
    chunks of 2**13 elements at E = 512-1024."""
    be = row_block(E)
    bk = max(1, min(64, (1 << (13 if be >= 2048 else 14)) // be))  # no tl.dot here: any power of two
    return bk, be, 8 if bk * be >= 4096 else 4


def cos_per_sample(xn, cc, tgt, s, g, ls, per, dot, dxn, gc, normalize):
    B, K, E = cc.shape
    if B == 0:
        return
    bk, be, warps = blocks(E)
    grad = g is not None
    _cos_ps_kernel[(B,)](xn, cc, tgt, g if grad else per, per, dot if grad else per, dxn if grad else per,
                         gc if grad else per, s, K, E, float(ls), NORMALIZE=normalize, HAS_GRAD=grad,
                         BLOCK_K=bk, BLOCK_E=be, num_warps=warps)


SPECS = [CompileSpec(f"_cos_ps_kernel[{p},E{e},norm={n},grad={g}]", _cos_ps_kernel,
                     signature(_cos_ps_kernel, x_ptr="*fp32", c_ptr=p, tgt_ptr="*i64", g_ptr="*fp32",
                               per_ptr="*fp32", dot_ptr="*fp32", dx_ptr="*fp32", gc_ptr=p, scale_ptr="*fp32",
                               ls="fp32"),
                     dict(NORMALIZE=n, HAS_GRAD=g, BLOCK_K=blocks(e)[0], BLOCK_E=blocks(e)[1]),
                     num_warps=blocks(e)[2])
         for p in ("*fp32", "*bf16", "*fp16") for e in (64, 512, 1024, 2048) for n in (False, True)
         for g in (False, True)]  # E = 2048: ViT-bigG (1280) and up
