"""Triton backend of the head ops: kernels, host launchers and COMPILE_SPECS.

Same scheme as the C++ backend (csrc/heads/heads.h): logits exist only as row tiles of at most
_TILE_ELEMS elements; a tiled `tl.dot` GEMM kernel builds them and the gradients' GEMMs, and one
fused row kernel per op does the per-row work (cross-entropy with an online log-sum-exp over
BLOCK_K class chunks, head agreement, normalisation). The cosine cross-entropy is fused
Cut-Cross-Entropy style: with shared class embeddings (E <= 512) three kernels stream the classes
(forward: online log-sum-exp; backward: dxn per row block, dcn per class block, logits recomputed),
so no logit tile ever reaches memory; with per-sample embeddings one kernel per sample streams its
K x E block (online log-sum-exp), then again for the gradients. Logits and gradients of logits are float32; GEMM operands are the input dtype for
bf16/fp16 (tensor cores) and float32 with IEEE products for float32 inputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._triton_compile import CompileSpec

_TILE_ELEMS = 1 << 22
_MM_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
_ROW_BLOCK_K = 256


# ---- kernels ---------------------------------------------------------------------------------------

@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, a_scale_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
               HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, SCALE_A: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr = False):
    """c[M, N] (=|+=) a[M, K] @ b[K, N] (+ bias[N]), float32 accumulation, any strides.

    SCALE_A: a is a float32 gradient tile and b half precision. Row m of a is divided by
    a_scale[m] (its largest magnitude) before the cast to b's dtype and the row of the product is
    multiplied back: (a / s) @ b * s == a @ b for any s, and a / s lies in [-1, 1], so values of
    order 1e-8 (a mean-reduced loss over a large batch) keep fp16's relative precision instead of
    flushing to subnormals. Offsets are int64: rows x stride passes 2**31 on large batches or views.
    UPCAST (interpreter only: its bf16 tl.dot is wrong) multiplies in float32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    if SCALE_A:
        a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=1.0)
        a_inv = 1.0 / a_scale
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        if SCALE_A:
            a = (a * a_inv[:, None]).to(b.dtype)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if SCALE_A:
        acc = acc * a_scale[:, None]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0)
    tl.store(c_ptrs, acc, mask=mask)


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


@triton.jit
def _agree_rows_kernel(z_ptr, g_ptr, per_ptr, D, K, stride_row, KIND: tl.constexpr, HAS_GRAD: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Head agreement of one row's [D, K] logits (kind 0: mean_d KL(p_d || mean p); kind 1: mean
    pairwise symmetric KL), written over z as dJ/dz when HAS_GRAD (formulas in csrc/heads/cpu.cpp)."""
    row = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    mask = (rd[:, None] < D) & (rk[None, :] < K)
    ptrs = z_ptr + row * stride_row + rd[:, None] * K + rk[None, :]
    z = tl.load(ptrs, mask=mask, other=float("-inf"))
    mx = tl.max(z, 1)
    mx = tl.where(rd < D, mx, 0.0)
    ssum = tl.sum(tl.where(mask, tl.exp(z - mx[:, None]), 0.0), 1)
    lse = mx + tl.log(tl.where(rd < D, ssum, 1.0))
    lse = tl.where(rd < D, lse, 0.0)
    lp = tl.where(mask, z - lse[:, None], 0.0)
    p = tl.where(mask, tl.exp(lp), 0.0)
    col_p = tl.sum(p, 0)
    Df = D * 1.0
    if KIND == 0:
        log_m = tl.where(rk < K, tl.log(tl.maximum(col_p, 1e-38) / Df), 0.0)
        diff = tl.where(mask, lp - log_m[None, :], 0.0)
        kl = tl.sum(p * diff, 1)
        tl.store(per_ptr + row, tl.sum(kl, 0) / Df)
        if HAS_GRAD:
            c = tl.load(g_ptr + row) / Df
            tl.store(ptrs, c * p * (diff - kl[:, None]), mask=mask)
    else:
        col_lp = tl.sum(lp, 0)
        norm = 2.0 / (Df * (Df - 1.0))
        plp = tl.sum(tl.sum(p * lp, 1), 0)
        cross = tl.sum(col_p * col_lp, 0)
        tl.store(per_ptr + row, (Df * plp - cross) * norm)
        if HAS_GRAD:
            c = tl.load(g_ptr + row) * norm
            a = Df * lp - col_lp[None, :]
            pa = tl.sum(p * a, 1)
            dz = c * (p * (a - pa[:, None]) + Df * p - col_p[None, :])
            tl.store(ptrs, dz, mask=mask)


@triton.jit
def _mapper_rows_kernel(x_ptr, y_ptr, norm_ptr, E, RESIDUAL: tl.constexpr, NORMALIZE: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    """y <- (x - y if RESIDUAL else y), then / max(||.||, 1e-12) if NORMALIZE (norm gets ||.||)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    y = tl.load(y_ptr + row * E + offs, mask=mask, other=0.0)
    if RESIDUAL:
        y = tl.load(x_ptr + row * E + offs, mask=mask, other=0.0).to(tl.float32) - y
    if NORMALIZE:
        n = tl.sqrt(tl.sum(y * y, 0))
        tl.store(norm_ptr + row, n)
        y = y / tl.maximum(n, 1e-12)
    tl.store(y_ptr + row * E + offs, y, mask=mask)


@triton.jit
def _normalize_grad_kernel(g_ptr, out_ptr, norm_ptr, res_ptr, E, BLOCK_E: tl.constexpr):
    """dL/dr for out = r / max(||r||, eps): (g - out <out, g> [||r|| > eps]) / max(||r||, eps)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    g = tl.load(g_ptr + row * E + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + row * E + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(norm_ptr + row)
    d = tl.where(n > 1e-12, tl.sum(o * g, 0), 0.0)
    tl.store(res_ptr + row * E + offs, (g - o * d) / tl.maximum(n, 1e-12), mask=mask)


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
        kmask = rk < K
        cm = kmask[:, None] & emask[None, :]
        c = tl.load(cb + rk[:, None] * E + re[None, :], mask=cm, other=0.0).to(tl.float32)
        dv = tl.sum(c * x[None, :], 1)
        if NORMALIZE:
            dv = dv / tl.maximum(tl.sqrt(tl.sum(c * c, 1)), 1e-12)
        z = tl.where(kmask, sc * dv, float("-inf"))
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
            kmask = rk < K
            cm = kmask[:, None] & emask[None, :]
            c = tl.load(cb + rk[:, None] * E + re[None, :], mask=cm, other=0.0).to(tl.float32)
            dv = tl.sum(c * x[None, :], 1)
            if NORMALIZE:
                nrm = tl.sqrt(tl.sum(c * c, 1))
                den = tl.maximum(nrm, 1e-12)
            else:
                nrm = tl.zeros((BLOCK_K,), dtype=tl.float32)
                den = tl.full((BLOCK_K,), 1.0, tl.float32)
            cos = dv / den
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


@triton.jit
def _cos_dot(x, c, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # x [M, E] @ c[N, E]^T -> [M, N] float32
    if UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
    elif IEEE:
        return tl.dot(x, tl.trans(c), input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(c))


@triton.jit
def _cos_lse_kernel(x_ptr, c_ptr, tgt_ptr, scale_ptr, lse_ptr, per_ptr, B, K, E, ls, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Shared-class cosine CE forward, Cut-Cross-Entropy style: a BLOCK_M row block streams the
    classes BLOCK_K at a time (tl.dot logits, online log-sum-exp); no logits leave the chip."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    re = tl.arange(0, BLOCK_E)
    rk0 = tl.arange(0, BLOCK_K)
    mmask = rm < B
    x = tl.load(x_ptr + rm[:, None] * E + re[None, :], mask=mmask[:, None] & (re[None, :] < E), other=0.0)
    t = tl.load(tgt_ptr + rm, mask=mmask, other=-1)
    sc = tl.load(scale_ptr)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + rk0).to(tl.int64)
        kmask = rk < K
        c = tl.load(c_ptr + rk[:, None] * E + re[None, :], mask=kmask[:, None] & (re[None, :] < E), other=0.0)
        z = _cos_dot(x, c, IEEE, UPCAST) * sc
        z = tl.where(kmask[None, :], z, float("-inf"))
        nm = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - nm) + tl.sum(tl.exp(z - nm[:, None]), 1)
        zsum += tl.sum(tl.where(kmask[None, :], z, 0.0), 1)
        zt += tl.sum(tl.where(rk[None, :] == t[:, None], z, 0.0), 1)
        m = nm
    lse = m + tl.log(s)
    per = tl.where(t >= 0, lse - (1.0 - ls) * zt - ls / K * zsum, 0.0)
    tl.store(lse_ptr + rm, lse, mask=mmask)
    tl.store(per_ptr + rm, per, mask=mmask)


@triton.jit
def _cos_q(x, c, rk, t, lse, K, sc, ls, kmask, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Recomputed logits z and q = dz / g = softmax - ls/K - (1 - ls) onehot (in [-1, 1]; 0 for
    ignored rows and padding). Keeping the per-row upstream weight g out of the half-precision
    operand is what keeps values of order g/K (1e-8 for a mean over a large batch) out of fp16's
    subnormal range."""
    z = _cos_dot(x, c, IEEE, UPCAST) * sc
    q = tl.exp(z - lse[:, None]) - ls / K - tl.where(rk[None, :] == t[:, None], 1.0 - ls, 0.0)
    q = tl.where(kmask[None, :] & (t[:, None] >= 0), q, 0.0)
    return z, q


@triton.jit
def _cos_dx_kernel(x_ptr, c_ptr, tgt_ptr, scale_ptr, lse_ptr, g_ptr, dx_ptr, dot_ptr, B, K, E, ls,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """dL/dxn_b = s g_b sum_k q_bk cn_k for a row block (logits recomputed chunk by chunk; g_b
    factored out of the sum), and sum_k dz_bk z_bk per row for the logit scale."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    re = tl.arange(0, BLOCK_E)
    rk0 = tl.arange(0, BLOCK_K)
    mmask = rm < B
    emask = re < E
    x = tl.load(x_ptr + rm[:, None] * E + re[None, :], mask=mmask[:, None] & emask[None, :], other=0.0)
    t = tl.load(tgt_ptr + rm, mask=mmask, other=-1)
    lse = tl.load(lse_ptr + rm, mask=mmask, other=0.0)
    g = tl.load(g_ptr + rm, mask=mmask, other=0.0)
    sc = tl.load(scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + rk0).to(tl.int64)
        kmask = rk < K
        c = tl.load(c_ptr + rk[:, None] * E + re[None, :], mask=kmask[:, None] & emask[None, :], other=0.0)
        z, q = _cos_q(x, c, rk, t, lse, K, sc, ls, kmask, IEEE, UPCAST)
        d += tl.sum(q * z, 1)
        if UPCAST:
            acc = tl.dot(q, c.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(q, c, acc, input_precision="ieee")
        else:
            acc = tl.dot(q.to(c.dtype), c, acc)
    tl.store(dx_ptr + rm[:, None] * E + re[None, :], acc * (g * sc)[:, None], mask=mmask[:, None] & emask[None, :])
    tl.store(dot_ptr + rm, d * g, mask=mmask)


@triton.jit
def _cos_dc_kernel(x_ptr, c_ptr, tgt_ptr, scale_ptr, lse_ptr, g_ptr, gmax_ptr, dc_ptr, B, K, E, ls,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """dL/dcn_k = s gmax sum_b (g_b / gmax) q_bk xn_b for a class block, streaming the rows
    BLOCK_M at a time. gmax = max_b |g_b| keeps the half-precision operand in [-1, 1] (rows with a
    far smaller weight contribute proportionally little to the sum)."""
    rk = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    re = tl.arange(0, BLOCK_E)
    rm0 = tl.arange(0, BLOCK_M)
    kmask = rk < K
    emask = re < E
    c = tl.load(c_ptr + rk[:, None] * E + re[None, :], mask=kmask[:, None] & emask[None, :], other=0.0)
    sc = tl.load(scale_ptr)
    gmax = tl.load(gmax_ptr)
    ginv = 1.0 / gmax
    acc = tl.zeros((BLOCK_K, BLOCK_E), dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rm = (m0 + rm0).to(tl.int64)
        mmask = rm < B
        x = tl.load(x_ptr + rm[:, None] * E + re[None, :], mask=mmask[:, None] & emask[None, :], other=0.0)
        t = tl.load(tgt_ptr + rm, mask=mmask, other=-1)
        lse = tl.load(lse_ptr + rm, mask=mmask, other=0.0)
        g = tl.load(g_ptr + rm, mask=mmask, other=0.0)
        z, q = _cos_q(x, c, rk, t, lse, K, sc, ls, kmask, IEEE, UPCAST)
        a = q * (g * ginv)[:, None]
        if UPCAST:
            acc = tl.dot(tl.trans(a), x.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(tl.trans(a), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a).to(x.dtype), x, acc)
    tl.store(dc_ptr + rk[:, None] * E + re[None, :], acc * (sc * gmax), mask=kmask[:, None] & emask[None, :])


# ---- host helpers ----------------------------------------------------------------------------------

def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _op_dtype(t):
    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _row_scale(a):
    """Largest magnitude of each row of a float32 operand (1 for an all-zero row)."""
    s = a.abs().amax(1)
    return torch.where(s > 0, s, torch.ones_like(s)).contiguous()


def _mm(a, b, out=None, bias=None, accumulate=False):
    """out (float32, [M, N]) (=|+=) a [M, K] @ b [K, N] (+ bias). a and b share a dtype, or a is a
    float32 gradient tile and b half precision: a is then cast row-scaled (see _mm_kernel)."""
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
        if bias is not None:
            out += bias
        return out
    scale_a = a.dtype == torch.float32 and b.dtype != torch.float32
    a_scale = _row_scale(a) if scale_a else out
    grid = (triton.cdiv(M, _MM_BLOCKS["BLOCK_M"]), triton.cdiv(N, _MM_BLOCKS["BLOCK_N"]))
    _mm_kernel[grid](a, b, out, bias if bias is not None else out, a_scale, M, N, K, a.stride(0), a.stride(1),
                     b.stride(0), b.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
                     ACCUMULATE=accumulate, SCALE_A=scale_a, IEEE=b.dtype == torch.float32, **_MM_BLOCKS,
                     num_warps=4, UPCAST=b.dtype == torch.bfloat16 and _interpreting())
    return out


def _ce_rows(z, tgt, g, ls, per, dot=None):
    R, K = z.shape
    if R == 0:
        return
    _ce_rows_kernel[(R,)](z, tgt, g if g is not None else per, per, dot if dot is not None else per, K, z.stride(0),
                          float(ls), HAS_GRAD=g is not None, HAS_DOT=dot is not None, BLOCK_K=_ROW_BLOCK_K,
                          num_warps=4)


def _agree_blocks(D, K):
    bd, bk = triton.next_power_of_2(D), max(16, triton.next_power_of_2(K))
    if bd * bk > 1 << 16:
        raise NotImplementedError(f"head_agreement triton kernel holds one row's D x K logits in registers; "
                                  f"D = {D}, K = {K} is too large (use the cpp/cuda or reference backend)")
    return bd, bk


def _agree_rows(z, kind, g, per):
    R, D, K = z.shape
    if R == 0:
        return
    bd, bk = _agree_blocks(D, K)
    _agree_rows_kernel[(R,)](z, g if g is not None else per, per, D, K, z.stride(0), KIND=kind,
                             HAS_GRAD=g is not None, BLOCK_D=bd, BLOCK_K=bk, num_warps=8 if bd * bk >= 4096 else 4)


def _tile_rows(per_row, rows):
    return max(1, min(rows, _TILE_ELEMS // max(per_row, 1)))


def _groups(domain, D):
    order = torch.sort(domain.long(), stable=True)[1]
    counts = torch.bincount(domain.long(), minlength=D).tolist()  # one device->host copy
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return order, offsets


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_fp64(x):
    if x.dtype == torch.float64:
        raise NotImplementedError("the triton head kernels run float32/bfloat16/float16 (float64: use cpp or reference)")


# ---- domain_fanout ---------------------------------------------------------------------------------

def fanout_forward(x, w, b):
    _check_fp64(x)
    B, F = x.shape
    D, K, _ = w.shape
    w2 = w.reshape(D * K, F)
    out = _mm(x, w2.t(), bias=None if b is None else b.reshape(D * K).float().contiguous())
    return out.to(x.dtype).view(B, D, K)


def fanout_backward(g, x, w, has_bias):
    B, F = x.shape
    D, K, _ = w.shape
    g2 = g.reshape(B, D * K)
    gx = _mm(g2, w.reshape(D * K, F))
    gw = _mm(g2.t(), x)
    gb = g2.float().sum(0)
    return gx.to(x.dtype), gw.to(w.dtype).view(D, K, F), gb.to(w.dtype).view(D, K)


# ---- domain_cross_entropy ----------------------------------------------------------------------------

def _dce(g, x, w, b, domain, target, all_heads, ls):
    _check_fp64(x)
    B, F = x.shape
    D, K, _ = w.shape
    dev = x.device
    opd = _op_dtype(x)
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
        R = _tile_rows(D * K, B)
        for r0 in range(0, B, R):
            n = min(R, B - r0)
            xb = xo[r0:r0 + n]
            z = _mm(xb, w2.t(), bias=b2)
            per_rows = torch.empty(n * D, dtype=torch.float32, device=dev)
            _ce_rows(z.view(n * D, K), t_rep[r0 * D:(r0 + n) * D], g_rep[r0 * D:(r0 + n) * D] if grad else None, ls,
                     per_rows)
            per[r0:r0 + n] = per_rows.view(n, D).mean(1)
            if grad:
                _mm(z, w2, out=gx[r0:r0 + n])
                _mm(z.t(), xb, out=gw, accumulate=True)
                gb += z.sum(0)
    else:
        order, off = _groups(domain, D)
        xs, ts = xo.index_select(0, order), tgt.index_select(0, order)
        gs = g.float().index_select(0, order) if grad else None
        per_s = torch.empty(B, dtype=torch.float32, device=dev)
        gxs = torch.empty(B, F, dtype=torch.float32, device=dev) if grad else None
        gw3, gb2 = (gw.view(D, K, F), gb.view(D, K)) if grad else (None, None)
        R = _tile_rows(K, B)
        for d in range(D):
            for r0 in range(off[d], off[d + 1], R):
                n = min(R, off[d + 1] - r0)
                xb = xs[r0:r0 + n]
                z = _mm(xb, wo[d].t(), bias=None if bf is None else bf[d])
                _ce_rows(z, ts[r0:r0 + n], gs[r0:r0 + n] if grad else None, ls, per_s[r0:r0 + n])
                if grad:
                    _mm(z, wo[d], out=gxs[r0:r0 + n])
                    _mm(z.t(), xb, out=gw3[d], accumulate=True)
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


# ---- head_agreement ----------------------------------------------------------------------------------

def _agree(g, x, w, b, kind):
    _check_fp64(x)
    B, F = x.shape
    D, K, _ = w.shape
    _agree_blocks(D, K)
    dev = x.device
    opd = _op_dtype(x)
    xo, w2 = x.to(opd), w.to(opd).reshape(D * K, F)
    b2 = None if b is None else b.float().contiguous().reshape(D * K)
    grad = g is not None
    gf = g.float() if grad else None
    per = torch.empty(B, dtype=torch.float32, device=dev)
    gx = torch.empty(B, F, dtype=torch.float32, device=dev) if grad else None
    gw = torch.zeros(D * K, F, dtype=torch.float32, device=dev) if grad else None
    gb = torch.zeros(D * K, dtype=torch.float32, device=dev) if grad else None
    R = _tile_rows(D * K, B)
    for r0 in range(0, B, R):
        n = min(R, B - r0)
        xb = xo[r0:r0 + n]
        z = _mm(xb, w2.t(), bias=b2)
        _agree_rows(z.view(n, D, K), kind, gf[r0:r0 + n] if grad else None, per[r0:r0 + n])
        if grad:
            _mm(z, w2, out=gx[r0:r0 + n])
            _mm(z.t(), xb, out=gw, accumulate=True)
            gb += z.sum(0)
    if not grad:
        return per
    return gx.to(x.dtype), gw.view(D, K, F).to(w.dtype), gb.view(D, K).to(w.dtype), per


def agree_forward(x, w, b, kind):
    return _agree(None, x, w, b, kind)


def agree_backward(g, x, w, b, kind):
    return _agree(g, x, w, b, kind)


# ---- mapper_project ------------------------------------------------------------------------------------

def _row_block(E):
    return max(16, triton.next_power_of_2(E))


def _mapper_linear(xo, wo, bf, domain):
    if wo.dim() == 2:
        return _mm(xo, wo.t(), bias=bf)
    D, E, _ = wo.shape
    order, off = _groups(domain, D)
    xs = xo.index_select(0, order)
    ys = torch.empty(xo.shape[0], E, dtype=torch.float32, device=xo.device)
    for d in range(D):
        if off[d + 1] > off[d]:
            _mm(xs[off[d]:off[d + 1]], wo[d].t(), out=ys[off[d]:off[d + 1]], bias=None if bf is None else bf[d])
    return torch.empty_like(ys).index_copy_(0, order, ys)


def mapper_forward(x, w, b, domain, residual, normalize):
    _check_fp64(x)
    opd = _op_dtype(x)
    y = _mapper_linear(x.to(opd), w.to(opd), None if b is None else b.float().contiguous(), domain).contiguous()
    B, E = y.shape
    norm = torch.empty(B if normalize else 0, dtype=torch.float32, device=x.device)
    if B:
        _mapper_rows_kernel[(B,)](x.contiguous(), y, norm if normalize else y, E, RESIDUAL=residual,
                                  NORMALIZE=normalize, BLOCK_E=_row_block(E), num_warps=4)
    return y.to(x.dtype), norm


def mapper_backward(g, x, w, domain, out, norm, residual, normalize):
    B, E = g.shape
    gf = g.float().contiguous()
    if normalize:
        gr = torch.empty_like(gf)
        if B:
            _normalize_grad_kernel[(B,)](gf, out.contiguous(), norm, gr, E, BLOCK_E=_row_block(E), num_warps=4)
    else:
        gr = gf
    gy = -gr if residual else gr
    opd = _op_dtype(x)
    xo, wo = x.to(opd), w.to(opd)
    gyo = gy  # float32: _mm casts it row-scaled
    if wo.dim() == 2:
        gx = _mm(gyo, wo)
        gw = _mm(gyo.t(), xo)
        gb = gy.sum(0)
    else:
        D, _, F = wo.shape
        order, off = _groups(domain, D)
        xs, gys = xo.index_select(0, order), gyo.index_select(0, order)
        gxs = torch.empty(B, F, dtype=torch.float32, device=x.device)
        gw = torch.zeros(wo.shape, dtype=torch.float32, device=x.device)
        gb = torch.zeros(D, E, dtype=torch.float32, device=x.device)
        gy_s = gy.index_select(0, order)
        for d in range(D):
            lo, hi = off[d], off[d + 1]
            if hi > lo:
                _mm(gys[lo:hi], wo[d], out=gxs[lo:hi])
                _mm(gys[lo:hi].t(), xs[lo:hi], out=gw[d])
                gb[d] = gy_s[lo:hi].sum(0)
        gx = torch.empty_like(gxs).index_copy_(0, order, gxs)
    if residual:
        gx = gx + gr
    return gx.to(x.dtype), gw.to(w.dtype), gb.to(w.dtype)


# ---- cosine_cross_entropy ------------------------------------------------------------------------------

def _normalize(t):
    den = t.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return t.float() / den, den


def _normalize_backward(gy, y, den):
    active = (den > 1e-12).float()
    return (gy - y * (y * gy).sum(-1, keepdim=True) * active) / den


def _cosce(g, x, c, scale, target, normalize, ls, ignore_index):
    _check_fp64(x)
    B, E = x.shape
    dev = x.device
    grad = g is not None
    s = scale.float().reshape(1)
    tgt = torch.where(target == ignore_index, torch.full_like(target, -1), target).long().contiguous()
    gf = g.float().contiguous() if grad else None
    per = torch.empty(B, dtype=torch.float32, device=dev)
    dot = torch.empty(B, dtype=torch.float32, device=dev) if grad else None
    if normalize:
        xn, xden = _normalize(x)
    else:
        xn, xden = x.float(), None
    xn = xn.contiguous()
    if c.dim() == 3:
        K = c.shape[1]
        cc = c.contiguous()
        dxn = torch.empty(B, E, dtype=torch.float32, device=dev) if grad else None
        gc = torch.empty_like(cc) if grad else None
        if B:
            be = _row_block(E)
            bk = max(16, min(64, (1 << 14) // be))
            _cos_ps_kernel[(B,)](xn, cc, tgt, gf if grad else per, per, dot if grad else per, dxn if grad else per,
                                 gc if grad else per, s, K, E, float(ls), NORMALIZE=normalize, HAS_GRAD=grad,
                                 BLOCK_K=bk, BLOCK_E=be, num_warps=4)
    else:
        K = c.shape[0]
        opd = _op_dtype(x)
        if normalize:
            cn, cden = _normalize(c)
        else:
            cn, cden = c.float(), None
        xo, co = xn.to(opd).contiguous(), cn.to(opd).contiguous()
        dxn = torch.empty(B, E, dtype=torch.float32, device=dev) if grad else None
        if E <= _CCE_MAX_E:
            dcn = _cce(xo, co, tgt, s, gf, ls, per, dxn, dot) if B else torch.zeros(K, E, device=dev)
        else:
            dcn = _cos_tiles(xo, co, tgt, s, gf, ls, per, dxn, dot)
        if grad:
            gc = _normalize_backward(dcn, cn, cden) if normalize else dcn
            gc = gc.to(c.dtype)
    if not grad:
        return per
    gs = (dot.sum() / s[0]).to(scale.dtype).reshape(scale.shape)
    gx = _normalize_backward(dxn, xn, xden) if normalize else dxn
    return gx.to(x.dtype), gc, gs, per


_CCE_MAX_E = 512  # the fused kernels hold a row block's E features in registers (CLIP ViT-B: 512)
_CCE_BLOCKS = dict(BLOCK_M=16, BLOCK_K=32)


def _cce(xo, co, tgt, s, g, ls, per, dxn, dot):
    """Fused shared-class cosine CE (forward; with g also dxn, dot and the returned dcn)."""
    B, E = xo.shape
    K = co.shape[0]
    be = max(16, triton.next_power_of_2(E))
    flags = dict(IEEE=xo.dtype == torch.float32, UPCAST=xo.dtype == torch.bfloat16 and _interpreting(),
                 BLOCK_E=be, **_CCE_BLOCKS)
    lse = torch.empty(B, dtype=torch.float32, device=xo.device)
    bm, bk = _CCE_BLOCKS["BLOCK_M"], _CCE_BLOCKS["BLOCK_K"]
    _cos_lse_kernel[(triton.cdiv(B, bm),)](xo, co, tgt, s, lse, per, B, K, E, float(ls), **flags, num_warps=4)
    if g is None:
        return None
    _cos_dx_kernel[(triton.cdiv(B, bm),)](xo, co, tgt, s, lse, g, dxn, dot, B, K, E, float(ls), **flags,
                                         num_warps=4)
    dcn = torch.empty(K, E, dtype=torch.float32, device=xo.device)
    gmax = g.abs().amax().reshape(1)
    gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    _cos_dc_kernel[(triton.cdiv(K, bk),)](xo, co, tgt, s, lse, g, gmax, dcn, B, K, E, float(ls), **flags,
                                         num_warps=4)
    return dcn


def _cos_tiles(xo, co, tgt, s, g, ls, per, dxn, dot):
    """Row-tile fallback for wide features: [R, K] logit tiles, tl.dot GEMMs, fused row kernel."""
    B, E = xo.shape
    K = co.shape[0]
    grad = g is not None
    dcn = torch.zeros(K, E, dtype=torch.float32, device=xo.device) if grad else None
    R = _tile_rows(K, B)
    for r0 in range(0, B, R):
        n = min(R, B - r0)
        xb = xo[r0:r0 + n]
        z = _mm(xb, co.t())
        z.mul_(s)
        _ce_rows(z, tgt[r0:r0 + n], g[r0:r0 + n] if grad else None, ls, per[r0:r0 + n],
                 dot[r0:r0 + n] if grad else None)
        if grad:
            _mm(z, co, out=dxn[r0:r0 + n])
            _mm(z.t(), xb, out=dcn, accumulate=True)
    if grad:
        dxn.mul_(s)
        dcn.mul_(s)
    return dcn


def cosce_forward(x, c, scale, target, normalize, ls, ignore_index):
    return _cosce(None, x, c, scale, target, normalize, ls, ignore_index)


def cosce_backward(g, x, c, scale, target, normalize, ls, ignore_index):
    return _cosce(g, x, c, scale, target, normalize, ls, ignore_index)


# ---- ahead-of-time compile specs (every kernel x every constexpr variant the launchers use) ---------

def _specs():
    specs = []
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    mm_sig = dict(a_ptr=None, b_ptr=None, c_ptr="*fp32", bias_ptr="*fp32", M="i32", N="i32", K="i32", s_am="i32",
                  s_ak="i32", s_bk="i32", s_bn="i32", s_cm="i32", s_cn="i32", HAS_BIAS="constexpr",
                  ACCUMULATE="constexpr", IEEE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                  BLOCK_K="constexpr", UPCAST="constexpr")
    for dt, p in ptr.items():
        for has_bias in (False, True):
            for accumulate in (False, True):
                sig = dict(mm_sig, a_ptr=p, b_ptr=p)
                specs.append(CompileSpec(f"_mm_kernel[{p},bias={has_bias},acc={accumulate}]", _mm_kernel, sig,
                                         dict(HAS_BIAS=has_bias, ACCUMULATE=accumulate, IEEE=dt == torch.float32,
                                              UPCAST=False, **_MM_BLOCKS), num_warps=4))
    ce_sig = dict(z_ptr="*fp32", tgt_ptr="*i64", g_ptr="*fp32", per_ptr="*fp32", dot_ptr="*fp32", K="i32",
                  stride_z="i32", ls="fp32", HAS_GRAD="constexpr", HAS_DOT="constexpr", BLOCK_K="constexpr")
    for has_grad, has_dot in ((False, False), (True, False), (True, True)):
        specs.append(CompileSpec(f"_ce_rows_kernel[grad={has_grad},dot={has_dot}]", _ce_rows_kernel, ce_sig,
                                 dict(HAS_GRAD=has_grad, HAS_DOT=has_dot, BLOCK_K=_ROW_BLOCK_K), num_warps=4))
    ag_sig = dict(z_ptr="*fp32", g_ptr="*fp32", per_ptr="*fp32", D="i32", K="i32", stride_row="i32",
                  KIND="constexpr", HAS_GRAD="constexpr", BLOCK_D="constexpr", BLOCK_K="constexpr")
    for kind in (0, 1):
        for has_grad in (False, True):
            for bd, bk in ((4, 16), (8, 512), (8, 4096)):  # small heads, DomainNet-sized, near the limit
                specs.append(CompileSpec(f"_agree_rows_kernel[kind={kind},grad={has_grad},{bd}x{bk}]",
                                         _agree_rows_kernel, ag_sig,
                                         dict(KIND=kind, HAS_GRAD=has_grad, BLOCK_D=bd, BLOCK_K=bk),
                                         num_warps=8 if bd * bk >= 4096 else 4))
    for p in ptr.values():
        for residual in (False, True):
            for normalize in (False, True):
                specs.append(CompileSpec(
                    f"_mapper_rows_kernel[{p},res={residual},norm={normalize}]", _mapper_rows_kernel,
                    dict(x_ptr=p, y_ptr="*fp32", norm_ptr="*fp32", E="i32", RESIDUAL="constexpr",
                         NORMALIZE="constexpr", BLOCK_E="constexpr"),
                    dict(RESIDUAL=residual, NORMALIZE=normalize, BLOCK_E=512), num_warps=4))
        specs.append(CompileSpec(f"_normalize_grad_kernel[{p}]", _normalize_grad_kernel,
                                 dict(g_ptr="*fp32", out_ptr=p, norm_ptr="*fp32", res_ptr="*fp32", E="i32",
                                      BLOCK_E="constexpr"), dict(BLOCK_E=512), num_warps=4))
        for normalize in (False, True):
            for has_grad in (False, True):
                specs.append(CompileSpec(
                    f"_cos_ps_kernel[{p},norm={normalize},grad={has_grad}]", _cos_ps_kernel,
                    dict(x_ptr="*fp32", c_ptr=p, tgt_ptr="*i64", g_ptr="*fp32", per_ptr="*fp32", dot_ptr="*fp32",
                         dx_ptr="*fp32", gc_ptr=p, scale_ptr="*fp32", K="i32", E="i32", ls="fp32",
                         NORMALIZE="constexpr", HAS_GRAD="constexpr", BLOCK_K="constexpr", BLOCK_E="constexpr"),
                    dict(NORMALIZE=normalize, HAS_GRAD=has_grad, BLOCK_K=32, BLOCK_E=512), num_warps=4))
    for p, dt in (("*fp32", torch.float32), ("*bf16", torch.bfloat16), ("*fp16", torch.float16)):
        for be in (64, 512):
            flags = dict(IEEE=dt == torch.float32, UPCAST=False, BLOCK_E=be, **_CCE_BLOCKS)
            base = dict(x_ptr=p, c_ptr=p, tgt_ptr="*i64", scale_ptr="*fp32", lse_ptr="*fp32", B="i32", K="i32",
                        E="i32", ls="fp32", IEEE="constexpr", UPCAST="constexpr", BLOCK_M="constexpr",
                        BLOCK_K="constexpr", BLOCK_E="constexpr")
            sig_f = {k: v for k, v in base.items()}
            sig_f = dict(list(sig_f.items())[:5] + [("per_ptr", "*fp32")] + list(sig_f.items())[5:])
            specs.append(CompileSpec(f"_cos_lse_kernel[{p},E{be}]", _cos_lse_kernel, sig_f, flags, num_warps=4))
            sig_x = dict(list(base.items())[:5] + [("g_ptr", "*fp32"), ("dx_ptr", "*fp32"), ("dot_ptr", "*fp32")]
                         + list(base.items())[5:])
            specs.append(CompileSpec(f"_cos_dx_kernel[{p},E{be}]", _cos_dx_kernel, sig_x, flags, num_warps=4))
            sig_c = dict(list(base.items())[:5] + [("g_ptr", "*fp32"), ("dc_ptr", "*fp32")] + list(base.items())[5:])
            specs.append(CompileSpec(f"_cos_dc_kernel[{p},E{be}]", _cos_dc_kernel, sig_c, flags, num_warps=4))
    return specs


COMPILE_SPECS = _specs()
