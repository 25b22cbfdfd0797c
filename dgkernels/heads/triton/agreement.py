"""head_agreement: disagreement among the D heads of each sample, one row's [D, K] logits per
program (mean KL to the mixture, or mean pairwise symmetric KL), dJ/dz written over the tile."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_signature import CompileSpec
from ..._triton_signature import signature
from ._common import check_fp64, op_dtype, tile_rows
from .matmul import mm

MAX_TILE = 1 << 12  # one row's D x K logits per program, in registers (8 warps x 16 per thread)


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


def tile_refusal(D, K) -> str:
    """Why the kernel cannot hold one row's D x K logits ('' if it can; sizes not stated: '')."""
    if D is None or K is None:
        return ""
    bd, bk = triton.next_power_of_2(D), max(16, triton.next_power_of_2(K))
    if bd * bk > MAX_TILE:
        return (f"the triton head_agreement kernel holds one row's D x K logits in registers (padded tile "
                f"{bd} x {bk} > {MAX_TILE}); D = {D}, K = {K} is too large")
    return ""


def agree_blocks(D, K):
    why = tile_refusal(D, K)
    if why:
        raise NotImplementedError(why + " (use the cpp/cuda or reference backend)")
    return triton.next_power_of_2(D), max(16, triton.next_power_of_2(K))


def _agree_rows(z, kind, g, per):
    R, D, K = z.shape
    if R == 0:
        return
    bd, bk = agree_blocks(D, K)
    _agree_rows_kernel[(R,)](z, g if g is not None else per, per, D, K, z.stride(0), KIND=kind,
                             HAS_GRAD=g is not None, BLOCK_D=bd, BLOCK_K=bk, num_warps=agree_warps(bd, bk))


def _agree(g, x, w, b, kind):
    check_fp64(x)
    B, F = x.shape
    D, K, _ = w.shape
    agree_blocks(D, K)
    dev = x.device
    opd = op_dtype(x)
    xo, w2 = x.to(opd), w.to(opd).reshape(D * K, F)
    b2 = None if b is None else b.float().contiguous().reshape(D * K)
    grad = g is not None
    gf = g.float() if grad else None
    per = torch.empty(B, dtype=torch.float32, device=dev)
    gx = torch.empty(B, F, dtype=torch.float32, device=dev) if grad else None
    gw = torch.zeros(D * K, F, dtype=torch.float32, device=dev) if grad else None
    gb = torch.zeros(D * K, dtype=torch.float32, device=dev) if grad else None
    R = tile_rows(D * K, B)
    for r0 in range(0, B, R):
        n = min(R, B - r0)
        xb = xo[r0:r0 + n]
        z = mm(xb, w2.t(), bias=b2)
        _agree_rows(z.view(n, D, K), kind, gf[r0:r0 + n] if grad else None, per[r0:r0 + n])
        if grad:
            mm(z, w2, out=gx[r0:r0 + n])
            mm(z.t(), xb, out=gw, accumulate=True)
            gb += z.sum(0)
    if not grad:
        return per
    return gx.to(x.dtype), gw.view(D, K, F).to(w.dtype), gb.view(D, K).to(w.dtype), per


def agree_forward(x, w, b, kind):
    return _agree(None, x, w, b, kind)


def agree_backward(g, x, w, b, kind):
    return _agree(g, x, w, b, kind)


def agree_warps(bd, bk):
    """At most 16 logits per thread (a row's D x K tile and ~4 live copies of it stay within the
    255 registers; 128 per thread spilled 4 KB on sm_90)."""
    return min(8, max(4, bd * bk // (32 * 16)))


SPECS = [CompileSpec(f"_agree_rows_kernel[kind={kind},grad={g},{bd}x{bk}]", _agree_rows_kernel,
                     signature(_agree_rows_kernel, z_ptr="*fp32", g_ptr="*fp32", per_ptr="*fp32"),
                     dict(KIND=kind, HAS_GRAD=g, BLOCK_D=bd, BLOCK_K=bk), num_warps=agree_warps(bd, bk))
         for kind in (0, 1) for g in (False, True)
         for bd, bk in ((4, 16), (8, 512), (16, 256), (2, 2048))]  # small heads, DomainNet-sized, the limit
