"""Tiled GEMM of the head ops: c (=|+=) a @ b (+ bias) in float32, any strides.

Logit tiles, and the gradient GEMMs of every head op, go through this one kernel. A float32
gradient operand against half-precision weights is cast row-scaled (see _mm_kernel), which is what
keeps the small-gradient regime at fp32-backend accuracy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_signature import CompileSpec
from ..._triton_signature import signature
from ._common import interpreting, launch_prec

MM_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, a_scale_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
               HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, SCALE_A: tl.constexpr, FP32: tl.constexpr,
               PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr = False):
    """c[M, N] (=|+=) a[M, K] @ b[K, N] (+ bias[N]), float32 accumulation, any strides.

    SCALE_A: a is a float32 gradient tile and b half precision. Row m of a is divided by
    a_scale[m] (its largest magnitude) before the cast to b's dtype and the row of the product is
    multiplied back: (a / s) @ b * s == a @ b for any s, and a / s lies in [-1, 1], so values of
    order 1e-8 (a mean-reduced loss over a large batch) keep fp16's relative precision instead of
    flushing to subnormals. Offsets are int64: rows x stride passes 2**31 on large batches or views.
    FP32: float32 operands, products at PREC ("ieee" or "tf32", see _common.fp32_precision).
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
        elif FP32:
            acc = tl.dot(a, b, acc, input_precision=PREC)
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


def _row_scale(a):
    """Largest magnitude of each row of a float32 operand (1 for an all-zero row)."""
    s = a.abs().amax(1)
    return torch.where(s > 0, s, torch.ones_like(s)).contiguous()


def mm(a, b, out=None, bias=None, accumulate=False):
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
    grid = (triton.cdiv(M, MM_BLOCKS["BLOCK_M"]), triton.cdiv(N, MM_BLOCKS["BLOCK_N"]))
    _mm_kernel[grid](a, b, out, bias if bias is not None else out, a_scale, M, N, K, a.stride(0), a.stride(1),
                     b.stride(0), b.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
                     ACCUMULATE=accumulate, SCALE_A=scale_a, FP32=b.dtype == torch.float32, PREC=launch_prec(b.dtype),
                     **MM_BLOCKS, num_warps=4, UPCAST=b.dtype == torch.bfloat16 and interpreting())
    return out


def _specs():
    specs = []
    for p, dts in (("*fp32", [("*fp32", "ieee"), ("*fp32", "tf32")]), ("*bf16", [("*bf16", ""), ("*fp32", "")]),
                   ("*fp16", [("*fp16", ""), ("*fp32", "")])):
        for a_t, prec in dts:
            for has_bias in (False, True):
                for accumulate in (False, True):
                    scale_a = a_t != p
                    sig = signature(_mm_kernel, a_ptr=a_t, b_ptr=p, c_ptr="*fp32", bias_ptr="*fp32",
                                    a_scale_ptr="*fp32")
                    specs.append(CompileSpec(
                        f"_mm_kernel[{a_t}x{p}{',' + prec if prec else ''},bias={has_bias},acc={accumulate}]",
                        _mm_kernel, sig, dict(HAS_BIAS=has_bias, ACCUMULATE=accumulate, SCALE_A=scale_a,
                                              FP32=p == "*fp32", PREC=prec or "ieee", UPCAST=False, **MM_BLOCKS),
                        num_warps=4))
    return specs


SPECS = _specs()
