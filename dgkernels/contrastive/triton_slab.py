"""Triton backward of the contrastive primitive at wide D: G written in row slabs, then dQ and dK
as two GEMMs whose output tiles stay on chip for their whole reduction.

Why the fused backward (triton.py) is not used at CLIP widths (D = 512-1280): it holds dQ on chip
only where a [BLOCK_M, D] fp32 accumulator fits next to the S tile (D <= 64 in half precision):
at 128 x 512 that accumulator is 256 KiB, more than a Hopper SM's registers and than the 227 KiB of
shared memory a block may take. Wider, it adds dQ and dK to fp32 buffers with atomics on every
tile: 64 flops per byte of L2 traffic at its 128 x 64 tiles, an L2-bound ceiling well under the
tensor cores' rate (benchmarks/results/gpu_roofline.md). Here, for a slab of R rows of Q:

  1. _g_slab_kernel, one program per BLOCK_M x BLOCK_N tile of the slab against the M columns,
     recomputes S over D (as the fused kernels: _tile) and forms G = w_r P_row + w_c P_col in fp32
     (_grad_tile, shared with the fused backward). It writes G twice in the input dtype, scaled by
     the exact powers of two of triton.py so that fp16/bf16 operands keep G's fp32 precision:
     GR = c_r G ([R, M], scaled per row, the factor constant along dQ's reduction) and
     GCT = (c_c G)^T ([M, R], per column, constant along dK's reduction), and one dscale partial sum
     per program from the fp32 G.
  2. dQ[slab] = GR @ K (_gemm_kernel): each program keeps its [BLOCK_M, BLOCK_N] fp32 output tile in
     registers across its share of the M reduction. The slab's dQ is only R x D (a few dozen output
     tiles), so the reduction is split over SPLITS programs to fill the GPU (_splits), their partial
     tiles summed in a fixed order afterwards.
  3. dK += GCT @ Q[slab]: the same kernel, the reduction over the slab's R rows on chip, and dK read
     and written once per slab by the one program that owns each output tile.
No atomics anywhere: the result is bitwise reproducible run to run (the fused kernel's atomics are
not). The accumulators, partial tiles, dQ and dK are fp32; the slab itself is in the input dtype.

Cost, per slab at N = M and half precision: 6 R M D flops (S, dQ and dK, 2 R M D each, as the fused
backward). Traffic beyond the GEMMs' operand streams: GR and GCT written once and read once,
8 R M bytes, and dK's fp32 read-modify-write, 8 M D bytes: 6 R M D / (8 R M + 8 M D) flops per
byte = 0.75 / (1 / D + 1 / R). The slab height comes from a memory budget (_slab_rows): the slab
takes at most as many bytes as the fp32 dQ and dK buffers the backward holds anyway (never a
multiple of N x M), which at N = M is R = 4 D / (element size): R = 2 D for bf16/fp16, so the
intensity is D / 2: 256 flops per byte at D = 512 and 512 at D = 1024, HBM traffic, near or above an
H100's ridge of 798 TFLOP/s over 3 TB/s = 266 (benchmarks/roofline.py's measured ceilings), i.e.
tensor-core bound by construction from D = 512, against the fused kernel's L2-atomic bound.
It is used from SLAB_MIN_D (triton.lse_backward): at D = 256 the slab's 128 flops per HBM byte
(384 TFLOP/s at 3 TB/s) edge past the fused kernel's 64 per L2 byte (352 at the assumed 5.5 TB/s of
L2); narrower D keeps the fused kernel (no workspace; dQ held on chip up to its hold width).
Unmeasured on a GPU: benchmarks/gpu_bench.py's "fused backward (atomics)" rows time the fused
kernel at the same sizes (DGKERNELS_CONTRASTIVE_BWD=fused|slab overrides the choice).

Offsets: block bases in int64 (R M elements of a slab and rows x stride can pass 2^31), in-block
offsets int32. Every launch has the specialisation COMPILE_SPECS compiles: 16-aligned pointers,
D, row strides and the slab's leading dimensions (padded to multiples of 16).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._triton_signature import CompileSpec
from .._triton_signature import interpreting as _interpret
from .._triton_signature import signature as _read_signature
from . import triton as fused

SLAB_MIN_D = 256  # padded D from which the backward writes G slabs (see the module docstring)
STRATEGY_ENV = "DGKERNELS_CONTRASTIVE_BWD"  # auto (default) | fused | slab
_SLAB_ALIGN = 128  # slab heights are whole numbers of every config's BLOCK_M


@triton.jit(do_not_specialize=["N", "M", "row0", "R", "exclude_diag", "cols_on"])
def _g_slab_kernel(Q, K, LSE_R, LSE_C, W_R, W_C, C_R, C_C, GR, GCT, DS_PART, SCALE2, N, M, D, stride_qn,
                   stride_kn, ld_gr, ld_gct, row0, R, exclude_diag, cols_on,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                   DOT_F32: tl.constexpr):
    # Program (i, j): rows row0 + i*BLOCK_M.. of the slab (R rows) against columns j*BLOCK_N..
    # GR[local row, col] = c_r G, GCT[col, local row] = c_c G (input dtype); DS_PART[j, i].
    scale2 = tl.load(SCALE2)  # scale * log2(e), from device memory
    pid = tl.program_id(0)
    cid = tl.program_id(1)
    local = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_ok = local < R
    cols = cid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    Q_blk = Q + tl.cast(row0 + pid * BLOCK_M, tl.int64) * stride_qn
    K_blk = K + tl.cast(cid * BLOCK_N, tl.int64) * stride_kn
    s = fused._tile(Q_blk, K_blk, row_ok, col_ok, D, stride_qn, stride_kn,
                    BLOCK_M, BLOCK_N, BLOCK_D, PREC, DOT_F32) * scale2
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    w_r = tl.load(W_R + rows, mask=row_ok, other=0.0)
    g, s_kept = fused._grad_tile(s, rows, cols, row_ok, col_ok, lse_r, w_r, LSE_C, W_C, exclude_diag, cols_on)
    c_r = tl.load(C_R + rows, mask=row_ok, other=0.0)
    c_c = tl.load(C_C + cols, mask=col_ok, other=0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    gr_blk = GR + tl.cast(pid * BLOCK_M, tl.int64) * ld_gr + tl.cast(cid * BLOCK_N, tl.int64)
    tl.store(gr_blk + offs_m[:, None] * ld_gr + offs_n[None, :], (g * c_r[:, None]).to(Q.dtype.element_ty), mask=ok)
    gct_blk = GCT + tl.cast(cid * BLOCK_N, tl.int64) * ld_gct + tl.cast(pid * BLOCK_M, tl.int64)
    tl.store(gct_blk + offs_n[None, :] * ld_gct + offs_m[:, None], (g * c_c[None, :]).to(Q.dtype.element_ty),
             mask=ok)
    tl.store(DS_PART + cid * tl.num_programs(0) + pid, tl.sum(tl.sum(g * s_kept, axis=1), axis=0) / scale2)


@triton.jit(do_not_specialize=["M_", "N_", "K_", "k_per_split"])
def _gemm_kernel(A, B, C, M_, N_, K_, stride_am, stride_bk, stride_cm, stride_cs, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                 DOT_F32: tl.constexpr, ACCUMULATE: tl.constexpr):
    # C[split][M_, N_] (=|+=) A[M_, K range of the split] @ B[same K range, N_]: A and B in the input
    # dtype with unit stride along their last dimension, C float32. The output tile is accumulated
    # in registers over the whole K range and written once; ACCUMULATE adds it to C.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K_, k_lo + k_per_split)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = pid_m * BLOCK_M + offs_m < M_
    col_ok = pid_n * BLOCK_N + offs_n < N_
    a_ptr = (A + tl.cast(pid_m * BLOCK_M, tl.int64) * stride_am + tl.cast(k_lo, tl.int64)
             + offs_m[:, None] * stride_am + offs_k[None, :])
    b_ptr = (B + tl.cast(k_lo, tl.int64) * stride_bk + tl.cast(pid_n * BLOCK_N, tl.int64)
             + offs_k[:, None] * stride_bk + offs_n[None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + offs_k < k_hi
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = fused._dot(a, b, acc, PREC, DOT_F32)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_bk
    c_ptr = (C + tl.cast(split, tl.int64) * stride_cs + tl.cast(pid_m * BLOCK_M, tl.int64) * stride_cm
             + tl.cast(pid_n * BLOCK_N, tl.int64) + offs_m[:, None] * stride_cm + offs_n[None, :])
    ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr, mask=ok, other=0.0)
    tl.store(c_ptr, acc, mask=ok)


# ---- launch configurations: one per (kernel, dtype class), not autotuned -----------------------
# (BLOCK_M, BLOCK_N, BLOCK_D or BLOCK_K, num_warps, num_stages). The G kernel runs one tile per
# program, the fused forward's first tile at 8 warps (at 4 the fp16 variant spilled 156 bytes under
# Triton 3.8, ptxas -v, sm_90a); the GEMMs take the 128 x 128 x 64 tile
# of a compute-bound half-precision GEMM (wgmma, 3-stage pipeline) and a 64 x 64 x 32 fp32 one.
# Fixed, so no launch ever tunes and every config is compile-checked (COMPILE_SPECS); the choice
# is by construction and unmeasured on a GPU.
CONFIGS = {
    ("g", "half"): (128, 64, 64, 8, 3),
    ("g", "fp32"): (64, 64, 32, 4, 2),
    ("gemm", "half"): (128, 128, 64, 8, 3),
    ("gemm", "fp32"): (64, 64, 32, 4, 3),
}
_KERNELS = {"g": _g_slab_kernel, "gemm": _gemm_kernel}
_PTR_TYPES = {"g": dict(Q="in", K="in", GR="in", GCT="in", **{n: "f" for n in (
    "LSE_R", "LSE_C", "W_R", "W_C", "C_R", "C_C", "DS_PART", "SCALE2")}),
    "gemm": dict(A="in", B="in", C="f")}
_ALIGNED = {"g": ("D", "stride_qn", "stride_kn", "ld_gr", "ld_gct"),
            "gemm": ("stride_am", "stride_bk", "stride_cm", "stride_cs")}


def _cfg(kernel: str, dtype) -> dict:
    bm, bn, bd, w, s = CONFIGS[(kernel, fused._dclass(dtype))]
    inner = "BLOCK_D" if kernel == "g" else "BLOCK_K"
    return dict(BLOCK_M=bm, BLOCK_N=bn, **{inner: bd}), dict(num_warps=w, num_stages=s)


def _signature(kernel: str, t: str) -> dict:
    types = {name: (f"*{t}" if kind == "in" else "*fp32") for name, kind in _PTR_TYPES[kernel].items()}
    return _read_signature(_KERNELS[kernel], **types)


def _specs() -> list[CompileSpec]:
    specs = []
    for kernel in ("g", "gemm"):
        for dtype, prec in fused._LAUNCH_VARIANTS:
            t = fused._TL[dtype]
            sig = _signature(kernel, t)
            blocks, launch = _cfg(kernel, dtype)
            attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
                     if ty.startswith("*") or name in _ALIGNED[kernel]}
            tag = "_".join(f"{k[6:].lower()}{v}" for k, v in blocks.items())
            for extra in ([{}] if kernel == "g" else [{"ACCUMULATE": False}, {"ACCUMULATE": True}]):
                specs.append(CompileSpec(
                    f"contrastive_slab_{kernel}_{t}{'_' + prec if dtype == torch.float32 else ''}_{tag}"
                    f"_w{launch['num_warps']}_s{launch['num_stages']}{'_acc' if extra.get('ACCUMULATE') else ''}",
                    _KERNELS[kernel], sig, dict(**blocks, PREC=prec, DOT_F32=False, **extra), launch["num_warps"],
                    launch["num_stages"], attrs))
    return specs


COMPILE_SPECS: list[CompileSpec] = _specs()


# ---- launchers ---------------------------------------------------------------------------------

def strategy() -> str:
    """The backward strategy asked for by DGKERNELS_CONTRASTIVE_BWD: auto, fused or slab."""
    value = os.environ.get(STRATEGY_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "fused", "slab"):
        raise ValueError(f"{STRATEGY_ENV} must be auto, fused or slab, got {value!r}")
    return value


_MAX_COLS = 2 ** 31 // 256 - 16  # in-tile offsets (a block of rows x the slab's row length) stay int32


def wanted(d_padded: int, hold: int, m: int = 0) -> bool:
    """Whether the backward of a launch of (padded) width d against m columns writes G slabs: asked
    for, or (auto) D from SLAB_MIN_D where the fused kernel cannot hold dQ on chip. Never past
    _MAX_COLS columns (2^23), where a slab's in-tile offsets would leave int32."""
    choice = strategy()
    if m > _MAX_COLS:
        return False
    if choice != "auto":
        return choice == "slab"
    return hold == 0 and d_padded >= SLAB_MIN_D


def _ceil16(x: int) -> int:
    return -(-x // 16) * 16


def _slab_rows(n: int, m: int, d: int, elem: int) -> int:
    """Slab height R: GR and GCT (2 R M elements of the input dtype) take at most the bytes of the
    fp32 dQ and dK buffers ((n + m) d 4), in whole _SLAB_ALIGN blocks, at least one block, at most
    the n rows (rounded up to a block) and at most _MAX_COLS (GCT's row length)."""
    budget = (n + m) * d * 4
    rows = min(budget // (2 * max(m, 1) * elem), _MAX_COLS) // _SLAB_ALIGN * _SLAB_ALIGN  # GCT's row length too
    return max(_SLAB_ALIGN, min(rows, -(-n // _SLAB_ALIGN) * _SLAB_ALIGN))


_MIN_SPLIT_K = 1024  # a split's partial tile (BLOCK_M BLOCK_N 8 bytes out and back) costs 1 / 256 of its flops


def _splits(rows: int, d: int, k: int, dtype, device) -> int:
    """Split-K factor of the dQ GEMM: enough programs for _TARGET_WAVES per SM, each split's
    reduction at least _MIN_SPLIT_K deep (its fp32 partial tile is then at most 1 byte per 256 flops)."""
    blocks, _ = _cfg("gemm", dtype)
    tiles = triton.cdiv(rows, blocks["BLOCK_M"]) * triton.cdiv(d, blocks["BLOCK_N"])
    on_gpu = device.type == "cuda" and not _interpret()
    sms = fused._sm_count(device.index if device.index is not None else torch.cuda.current_device()) if on_gpu \
        else fused._DEFAULT_SMS
    want = triton.cdiv(fused._TARGET_WAVES * sms, tiles)
    return max(1, min(want, k // _MIN_SPLIT_K))


def _launch(kernel: str, grid, args, dtype, **constexprs):
    blocks, launch = _cfg(kernel, dtype)
    interp = _interpret()
    _KERNELS[kernel][grid](*args, **blocks, PREC=fused._prec(dtype), DOT_F32=interp and dtype == torch.bfloat16,
                           **constexprs, **({} if interp else launch))


def _gemm(a, b, out, rows: int, cols: int, k: int, accumulate: bool, splits: int = 1):
    """out[split] (=|+=) a[:rows, split's K range] @ b[split's K range, :cols]; out: [splits, rows, cols]
    fp32 (or [rows, cols] with one split)."""
    blocks, _ = _cfg("gemm", a.dtype)
    k_per = triton.cdiv(triton.cdiv(k, splits), blocks["BLOCK_K"]) * blocks["BLOCK_K"]
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(cols, blocks["BLOCK_N"]), triton.cdiv(k, k_per))
    stride_cm = out.stride(-2)
    stride_cs = out.stride(0) if out.dim() == 3 else 0
    _launch("gemm", grid, (a, b, out, rows, cols, k, a.stride(0), b.stride(0), stride_cm, stride_cs, k_per), a.dtype,
            ACCUMULATE=accumulate)
    return grid[2]


def lse_backward(q, k, scale2, exclude_diag: bool, lse_r, lse_c, w_r, w_c, c_r, c_c, cols_on: bool):
    """(c_r G K [n, d], c_c G^T Q [m, d], sum_ij G_ij S_ij / scale): the sums the fused backward
    returns, before the caller divides out the powers of two and multiplies by the scale. q, k: in
    triton._kernel_layout; the vectors float32 and contiguous, as triton.lse_backward makes them."""
    n, d = q.shape
    m = k.shape[0]
    dtype = q.dtype
    rows = _slab_rows(n, m, d, q.element_size())
    ld_gr, ld_gct = _ceil16(m), _ceil16(rows)
    gr = torch.empty(rows, ld_gr, dtype=dtype, device=q.device)
    gct = torch.empty(m, ld_gct, dtype=dtype, device=q.device)
    g_blocks, _ = _cfg("g", dtype)
    n_cb = triton.cdiv(m, g_blocks["BLOCK_N"])
    # one row of dscale partials per slab (padded to 4 floats: every row starts 16-byte aligned),
    # zeros where a short last slab has fewer programs; summed once at the end
    part_len = -(-n_cb * triton.cdiv(rows, g_blocks["BLOCK_M"]) // 4) * 4
    ds_part = torch.zeros(triton.cdiv(n, rows), part_len, dtype=torch.float32, device=q.device)
    dq = torch.empty(n, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(m, d, dtype=torch.float32, device=q.device)
    splits = _splits(rows, d, m, dtype, q.device)
    partial = torch.empty(splits, rows, d, dtype=torch.float32, device=q.device) if splits > 1 else None
    for slab, row0 in enumerate(range(0, n, rows)):
        r = min(rows, n - row0)
        n_rb = triton.cdiv(r, g_blocks["BLOCK_M"])
        _launch("g", (n_rb, n_cb), (q, k, lse_r, lse_c, w_r, w_c, c_r, c_c, gr, gct, ds_part[slab], scale2, n, m,
                                    d, q.stride(0), k.stride(0), ld_gr, ld_gct, row0, r, int(exclude_diag),
                                    int(cols_on)), dtype)
        if partial is None:
            _gemm(gr, k, dq[row0:row0 + r], r, d, m, accumulate=False)
        else:
            used = _gemm(gr, k, partial[:, :r], r, d, m, accumulate=False, splits=splits)
            torch.sum(partial[:used, :r], dim=0, out=dq[row0:row0 + r])
        _gemm(gct, q[row0:row0 + r], dk, m, d, r, accumulate=row0 > 0)
    return dq, dk, ds_part.sum()
