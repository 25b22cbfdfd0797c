"""Triton backend of the contrastive log-sum-exp primitive (CUDA tensors; CPU under TRITON_INTERPRET=1).

Forward: one program per block of BLOCK_M rows of Q streams over K in BLOCK_N blocks, computing
the tile S = scale * Q_blk K_blk^T with tl.dot (fp32 accumulation) and an online log-sum-exp.
Backward: one program per row block recomputes each tile, forms
G = w_r exp(S - lse_r) + w_c exp(S - lse_c) and accumulates dQ_raw = G K in registers (plus the
row block's share of dscale = sum q . dQ_raw).

Column statistics (lse_c) and dK come from the SAME kernels launched on the transposed problem
(K as the rows, Q as the columns). We chose this over atomics or per-row-block partial column
statistics: atomics would need a fixed exp reference per column (a Cauchy-Schwarz bound that
underflows fp32 for large logit scales) and the partial statistics cost O(N * M / BLOCK_M)
memory (gigabytes at N = 1M). The transposed launch keeps the memory O(N + M), the numerics
exact, and both kernels free of atomics, for 12 N M D flops in all instead of 8.

Feature sizes up to 512 run with the whole feature row in one block (BLOCK_D = next power of
two >= D); float64 or larger D go to the compiled CUDA kernels.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._triton_compile import CompileSpec

MAX_D = 512


@triton.jit
def _dot(a, b, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    # DOT_F32 is set only under TRITON_INTERPRET for bfloat16 inputs: the interpreter's tl.dot
    # misreads bfloat16 operands, so they are widened first (exact: bf16 products fit in fp32,
    # which is what the tensor cores compute). Compiled kernels always take the first branch.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _lse_fwd_kernel(Q, K, LSE, N, M, D, stride_qn, stride_qd, stride_kn, stride_kd, scale, exclude_diag,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                    DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    q = tl.load(Q + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(cols[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(k), PREC, DOT_F32) * scale
        drop = (cols[None, :] >= M) | ((rows[:, None] == cols[None, :]) & (exclude_diag != 0))
        s = tl.where(drop, float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no entry yet: no inf - inf
        l_i = l_i * tl.exp(m_i - ref) + tl.sum(tl.exp(s - ref[:, None]), axis=1)
        m_i = m_new
    ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(LSE + rows, ref + tl.log(l_i), mask=row_ok)


@triton.jit
def _lse_bwd_kernel(Q, K, LSE_R, LSE_C, W_R, W_C, DQ, DS_PART, N, M, D, stride_qn, stride_qd, stride_kn, stride_kd,
                    scale, exclude_diag, use_r, use_c,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                    DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < D
    q = tl.load(Q + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Rows outside [0, N) get zero weight and -inf logits, so nothing of theirs reaches dQ or dscale.
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0)
    w_r = tl.load(W_R + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC, DOT_F32) * scale
        drop = (~col_ok[None, :]) | (~row_ok[:, None]) | ((rows[:, None] == cols[None, :]) & (exclude_diag != 0))
        s = tl.where(drop, float("-inf"), s)
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if use_r != 0:
            g += w_r[:, None] * tl.exp(s - lse_r[:, None])
        if use_c != 0:
            lse_c = tl.load(LSE_C + cols, mask=col_ok, other=0.0)
            w_c = tl.load(W_C + cols, mask=col_ok, other=0.0)
            g += w_c[None, :] * tl.exp(s - lse_c[None, :])
        acc += _dot(g.to(k.dtype), k, PREC, DOT_F32)
    tl.store(DS_PART + pid, tl.sum(tl.sum(q.to(tl.float32) * acc, axis=1), axis=0))
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], acc * scale, mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launch configurations (each one is listed in COMPILE_SPECS and compiled for sm_80 / sm_90)
# --------------------------------------------------------------------------------------------

BLOCK_DS = (64, 128, 256, 512)


def _configs(block_d: int) -> list[dict]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates: smaller tiles as the rows get longer."""
    if block_d <= 128:
        raw = [(64, 64, 4, 3), (128, 64, 8, 3)]
    elif block_d == 256:
        raw = [(64, 64, 8, 2), (64, 32, 4, 2)]
    else:
        raw = [(64, 32, 8, 1)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s) for bm, bn, w, s in raw]


_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _prec(dtype) -> str:
    # fp32 inputs keep full fp32 products (no silent TF32); half types use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _fwd_signature(t: str) -> dict:
    sig = {"Q": f"*{t}", "K": f"*{t}", "LSE": "*fp32"}
    sig.update({n: "i32" for n in ("N", "M", "D", "stride_qn", "stride_qd", "stride_kn", "stride_kd")})
    sig.update({"scale": "fp32", "exclude_diag": "i32"})
    sig.update({n: "constexpr" for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "PREC", "DOT_F32")})
    return sig


def _bwd_signature(t: str) -> dict:
    sig = {"Q": f"*{t}", "K": f"*{t}", "LSE_R": "*fp32", "LSE_C": "*fp32", "W_R": "*fp32", "W_C": "*fp32",
           "DQ": "*fp32", "DS_PART": "*fp32"}
    sig.update({n: "i32" for n in ("N", "M", "D", "stride_qn", "stride_qd", "stride_kn", "stride_kd")})
    sig.update({"scale": "fp32", "exclude_diag": "i32", "use_r": "i32", "use_c": "i32"})
    sig.update({n: "constexpr" for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "PREC", "DOT_F32")})
    return sig


def _specs() -> list[CompileSpec]:
    specs = []
    for block_d in BLOCK_DS:
        for cfg in _configs(block_d):
            # Every config in bf16 (fp16 is the same code with another element type); the PREC="ieee"
            # variant (fp32 inputs) with the first config of the smallest and largest BLOCK_D.
            ieee = cfg == _configs(block_d)[0] and block_d in (BLOCK_DS[0], BLOCK_DS[-1])
            dtypes = [torch.bfloat16] + ([torch.float32] if ieee else [])
            for dtype in dtypes:
                t = _TL[dtype]
                cx = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, PREC=_prec(dtype), DOT_F32=False)
                tag = f"{t}_d{block_d}_m{cfg['BLOCK_M']}_n{cfg['BLOCK_N']}_w{cfg['num_warps']}_s{cfg['num_stages']}"
                for name, kern, sig in (("contrastive_lse_fwd", _lse_fwd_kernel, _fwd_signature(t)),
                                        ("contrastive_lse_bwd", _lse_bwd_kernel, _bwd_signature(t))):
                    specs.append(CompileSpec(f"{name}_{tag}", kern, sig, cx, cfg["num_warps"], cfg["num_stages"]))
    return specs


COMPILE_SPECS: list[CompileSpec] = _specs()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, block_d: int):
    """The kernel wrapped in triton.autotune over its configs for this BLOCK_D (GPU only)."""
    kernel = {"fwd": _lse_fwd_kernel, "bwd": _lse_bwd_kernel}[kernel_name]
    configs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in _configs(block_d)]
    # DS_PART is indexed by program id: zero it before every trial so a config with fewer row
    # blocks never leaves another config's partial sums behind.
    reset = ["DS_PART"] if kernel_name == "bwd" else None
    return triton.autotune(configs=configs, key=["N", "M", "D"], reset_to_zero=reset)(kernel)


def _launch(kernel_name: str, n: int, block_d: int, args: tuple, dtype):
    prec = _prec(dtype)
    if _interpret():
        # The interpreter cannot time configs: run the first one (the others are compile-checked).
        cfg = _configs(block_d)[0]
        kernel = {"fwd": _lse_fwd_kernel, "bwd": _lse_bwd_kernel}[kernel_name]
        grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
        kernel[grid](*args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, PREC=prec,
                     DOT_F32=dtype == torch.bfloat16)
        return
    tuned = _tuned(kernel_name, block_d)
    tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](*args, BLOCK_D=block_d, PREC=prec, DOT_F32=False)


def _block_d(d: int) -> int:
    return max(BLOCK_DS[0], triton.next_power_of_2(d))


def _fallback(q) -> object | None:
    """float64 or D > MAX_D: the compiled CUDA kernels (same primitive), when they exist."""
    if q.dtype in _TL and q.shape[1] <= MAX_D:
        return None
    from . import compiled
    from .. import _dispatch

    why = _dispatch.explain("clip_loss", q.device)["cuda"]
    if why:
        raise TypeError(f"the triton backend runs float16/bfloat16/float32 with D <= {MAX_D}, got {q.dtype} with "
                        f"D = {q.shape[1]}, and the cuda fallback is unavailable: {why}")
    return compiled


def _rows_lse(q, k, scale, exclude_diag):
    n, d = q.shape
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    args = (q, k, out, n, k.shape[0], d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale, int(exclude_diag))
    _launch("fwd", n, _block_d(d), args, q.dtype)
    return out


def lse_forward(q, k, scale: float, exclude_diag: bool, want_cols: bool):
    fb = _fallback(q)
    if fb is not None:
        return fb.lse_forward(q, k, scale, exclude_diag, want_cols)
    lse_r = _rows_lse(q, k, scale, exclude_diag)
    lse_c = _rows_lse(k, q, scale, exclude_diag) if want_cols else lse_r.new_empty(0)
    return lse_r, lse_c


def _rows_grad(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c, use_r, use_c):
    n, d = q.shape
    dq = torch.empty(n, d, dtype=torch.float32, device=q.device)
    block_m_min = min(c["BLOCK_M"] for c in _configs(_block_d(d)))
    ds_part = torch.zeros(triton.cdiv(n, block_m_min), dtype=torch.float32, device=q.device)
    args = (q, k, lse_r, lse_c, w_r, w_c, dq, ds_part, n, k.shape[0], d, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), scale, int(exclude_diag), int(use_r), int(use_c))
    _launch("bwd", n, _block_d(d), args, q.dtype)
    return dq, ds_part.sum()


def lse_backward(q, k, scale: float, exclude_diag: bool, lse_r, lse_c, w_r, w_c):
    fb = _fallback(q)
    if fb is not None:
        return fb.lse_backward(q, k, scale, exclude_diag, lse_r, lse_c, w_r, w_c)
    cols = w_c is not None
    if not cols:  # unused statistics still need valid [M] buffers (the kernels skip them by flag)
        lse_c_ = w_c_ = torch.zeros(k.shape[0], dtype=torch.float32, device=k.device)
    else:
        lse_c_, w_c_ = lse_c, w_c
    dq, ds = _rows_grad(q, k, scale, exclude_diag, lse_r, lse_c_, w_r, w_c_, True, cols)
    # dK: the same kernel on the transposed problem (rows of K, row statistics = column statistics).
    dk, _ = _rows_grad(k, q, scale, exclude_diag, lse_c_, lse_r, w_c_, w_r, cols, True)
    return dq, dk, ds
