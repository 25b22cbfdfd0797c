"""Triton backend of the contrastive log-sum-exp primitive (CUDA tensors; CPU under TRITON_INTERPRET=1).

One shared tile per (row block, column block), 8 N M D flops for forward + backward:

Forward (`_fwd_kernel`): program (i, c) of a 2-D grid takes BLOCK_M rows of Q against the c-th
column range of K (column_split: about two waves of programs on the GPU), streaming it in BLOCK_N
blocks. The tile S = scale Q_blk K_blk^T is accumulated over D in BLOCK_D chunks (tl.dot, fp32
accumulation; any D). Rows: an online log-sum-exp (exact) per column range, combined across the
ranges by the launcher. Columns: every program adds
sum_i exp(S_ij - c_j) to COLSUM[j] with an fp32 atomic, against a FIXED per-column reference
    c_j = scale max_i ||q_i|| ||k_j|| - A          (A = _COL_HEADROOM, log2 units)
Cauchy-Schwarz gives S_ij <= c_j + A, so every term is <= 2^A and the sum of N < 2^(127 - A)
terms cannot overflow. It can underflow when a column's largest logit lies far below its bound;
then COLSUM[j] < _COL_FLOOR and those columns alone are recomputed exactly by the same kernel on
the transposed problem (FIXUP: a row block of K with no flagged row runs zero iterations, so
there is no host sync and, in practice, no work). Sub-normal terms (< 2^-126, possibly flushed to
zero) then change an accepted sum by at most N 2^-126 / 2^-80 = N 2^-46 relative (< fp32 eps for
N < 4M).

Backward (`_bwd_kernel`, for D below triton_slab.SLAB_MIN_D): the same 2-D grid; each program
recomputes each of its tiles once and forms G = w_r exp(S - lse_r) + w_c exp(S - lse_c) in fp32
(_grad_tile), then
    DQ[rows] += (c_r G) K      (fp32 atomics: the column ranges of one row block share its rows)
    DK[cols] += (c_c G)^T Q    (fp32 atomics per tile and D chunk GRAD_D, FlashAttention-2 style)
dQ[rows] = sum over the program's column blocks of (c_r G) K_blk: with D at most DQ_HOLD (64 for
half precision and fp32 IEEE, 128 for fp32 TF32; HOLD_CONFIGS) the sum is kept in a
[BLOCK_M, DQ_HOLD] fp32 register accumulator across the column loop (FlashAttention-2's loop
order: one wgmma per tile into it) and added to DQ once per program, one atomic per element per
column split. Wider D adds each tile's product per GRAD_D chunk with atomics, as dK.
The operands of both dots are G cast to the input dtype (tensor cores), which is where the
precision would go: G is of order w / N and smaller (w ~ 1 / N for a mean), far below fp16's
normal range (2^-14) for large N or a scaled loss. So G is multiplied first by exact powers of
two fixed per row (c_r) and per column (c_c), chosen so the scaled entries are at most 2^15 (fp16
max 65504): c_r_i = 2^(15 - ceil(log2(|w_r_i| + max|w_c|))) bounds |c_r_i G_ij| since
P_row, P_col <= 1; c_c likewise with the roles swapped. Being constant along the summed index,
the factors come out of the dot exactly and are divided out once at the end (on O((N + M) D)).
Keeping G in fp32 instead would force a tf32 dot on fp32-converted K and Q (half the tensor-core
rate and twice the operand traffic); scaling keeps fp16/bf16 wgmma with the fp32 accuracy of G.

Offsets: each block's first row is addressed in int64 (rows * stride passes 2^31 for large N, V
or strides); offsets inside a block stay int32, which the launcher guarantees (_kernel_layout).
Every launch has the specialisation COMPILE_SPECS compiles (16-aligned pointers, D and row
strides; D is zero-padded to a multiple of 16 where needed), so the sm_90 register / spill /
wgmma figures of the compile check are those of what runs.

Cost model (L2 traffic of the backward's fp32 atomics, per tile of 6 BLOCK_M BLOCK_N D flops):
per-tile dQ and dK move 4 (BLOCK_M + BLOCK_N) D bytes, 6 BM BN / (4 (BM + BN)) = 64 flops per
byte at 128 x 64 tiles: an L2-bound ceiling near 350 TFLOP/s on an H100 by the estimate in
benchmarks/results/gpu_roofline.md (L2 bandwidth assumed). With dQ held, a tile moves 4 BLOCK_N D
bytes of dK plus, once per program, 4 BLOCK_M D bytes of dQ over COLS_PER_SPLIT / BLOCK_N tiles:
at the held config's 64 x 128 tiles 64 flops per byte when a split is its minimum 128 columns (one
tile: no saving) up to 6 BM / 4 = 96 for long splits (no column split: N > 33664 at N = M), an L2
ceiling of 350-530 TFLOP/s at the same L2 figure. The accumulator costs BLOCK_M DQ_HOLD /
(32 num_warps) registers per thread (16 at 64 rows, 64 wide, 8 warps) on top of half-precision
kernels that use all 255 (ptxas -v, sm_90a): 64 wide fits the 64-row config only (128 rows
spilled under Triton 3.6 or 3.8), 128 wide spilled 16-112 bytes and 256 wide 220-500 bytes
(Triton 3.8; benchmarks/results/triton_sm90_resources*.md). At the CLIP widths (D = 512-1280) an
accumulator cannot fit at all (128 x 512 x 4 B = 256 KiB, above the register file and the 227 KiB
of shared memory of an H100 block): from D = 256 lse_backward hands the backward to triton_slab.py,
which writes G in row slabs and computes dQ and dK as GEMMs holding their outputs on chip.
float64 is refused (the backend's declaration in dgkernels.contrastive): dispatch picks the next
backend.

Program order: programs of one column range sweep its K blocks in the same order (the backward
starts each row block at another block so the DK atomics rarely collide), so the programs resident
at one time read the same K block within a short window and share it in L2; K itself (N = 65536,
D = 512, bf16: 64 MiB) does not fit in an H100/H200 L2 (50 MiB) in any order. Unmeasured on a GPU.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .._triton_signature import CompileSpec
from .._triton_signature import interpreting as _interpret

LOG2E = math.log2(math.e)
_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
_COL_HEADROOM = 88.0  # A: terms <= 2^88, so sums of up to 2^39 rows stay below fp32 max (2^128)
_COL_FLOOR = 2.0 ** -80  # a column sum below this is recomputed exactly (see the module docstring)
_G_TOP = 15  # scaled G entries are <= 2^15 < fp16 max
MAX_D = None  # no limit: the kernels loop over D in BLOCK_D chunks


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    # DOT_F32 is set only under TRITON_INTERPRET for bfloat16 inputs: the interpreter's tl.dot
    # misreads bfloat16 operands, so they are widened first (exact: bf16 products fit in fp32,
    # which is what the tensor cores compute). Compiled kernels always take the second branch.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tile(Q_blk, K_blk, row_ok, col_ok, D, stride_qn, stride_kn,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
          DOT_F32: tl.constexpr):
    """Q_blk K_blk^T in fp32, accumulated over D in BLOCK_D chunks (Q_blk, K_blk: the blocks' first rows)."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    q_ptr = Q_blk + tl.arange(0, BLOCK_M)[:, None] * stride_qn + tl.arange(0, BLOCK_D)[None, :]
    k_ptr = K_blk + tl.arange(0, BLOCK_N)[:, None] * stride_kn + tl.arange(0, BLOCK_D)[None, :]
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + tl.arange(0, BLOCK_D) < D
        q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptr, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), s, PREC, DOT_F32)
        q_ptr += BLOCK_D
        k_ptr += BLOCK_D
    return s


@triton.jit
def _grad_tile(s, rows, cols, row_ok, col_ok, lse_r, w_r, LSE_C, W_C, exclude_diag, cols_on):
    """(G, S with its dropped entries zeroed) of one tile of scaled logits s (log2 units): G =
    w_r 2^(s - lse_r) + w_c 2^(s - lse_c) in fp32, lse_r and lse_c in log2 units; dropped entries
    (outside the rows or columns, or the diagonal under exclude_diag) get G = 0."""
    drop = (~col_ok[None, :]) | (~row_ok[:, None]) | ((rows[:, None] == cols[None, :]) & (exclude_diag != 0))
    s = tl.where(drop, float("-inf"), s)
    g = w_r[:, None] * tl.exp2(s - lse_r[:, None])
    if cols_on != 0:
        lse_c = tl.load(LSE_C + cols, mask=col_ok, other=0.0) * 1.4426950408889634
        w_c = tl.load(W_C + cols, mask=col_ok, other=0.0)
        g += w_c[None, :] * tl.exp2(s - lse_c[None, :])
    return g, tl.where(drop, 0.0, s)


# Flags and sizes are not specialised (no constant-1 or divisible-by-16 variants): what launches is
# exactly what COMPILE_SPECS compiles (the launcher makes pointers, D and row strides aligned).
# N_KEY, M_KEY: the autotuner's size key (power-of-two buckets, see _bucket); the kernels ignore them.
_RUNTIME_INTS = ["N", "M", "exclude_diag", "cols_on", "N_KEY", "M_KEY"]


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["fixup", "COLS_PER_SPLIT"])
def _fwd_kernel(Q, K, LSE, COLSUM, CREF, FLAGS, SCALE2, N, M, D, stride_qn, stride_kn,
                exclude_diag, cols_on, fixup, col_floor, N_KEY, M_KEY, COLS_PER_SPLIT,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                DOT_F32: tl.constexpr):
    # Grid (row block, column split): program (i, c) covers rows i*BLOCK_M.. against columns
    # [c*COLS_PER_SPLIT, (c+1)*COLS_PER_SPLIT) and writes its rows' partial log-sum-exp to
    # LSE[c, rows] (the launcher combines the splits; one split writes the result directly).
    # Works in log2 units: scale2 = scale * log2(e), read from device memory (no host copy of a
    # learnable scale per call); LSE is stored in natural units.
    scale2 = tl.load(SCALE2)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    Q_blk = Q + tl.cast(pid * BLOCK_M, tl.int64) * stride_qn  # int64: rows * stride passes 2^31
    start = split * COLS_PER_SPLIT
    end = tl.minimum(M, start + COLS_PER_SPLIT)
    if fixup != 0:
        # Transposed re-run for underflowed column sums: FLAGS holds them; other blocks skip.
        flag = tl.load(FLAGS + rows, mask=row_ok, other=1.0)
        n_bad = tl.sum((flag < col_floor).to(tl.int32), axis=0)
        end = tl.where(n_bad > 0, end, start)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        s = _tile(Q_blk, K + tl.cast(c0, tl.int64) * stride_kn, row_ok, col_ok, D, stride_qn, stride_kn,
                  BLOCK_M, BLOCK_N, BLOCK_D, PREC, DOT_F32) * scale2
        drop = (~col_ok[None, :]) | (~row_ok[:, None]) | ((rows[:, None] == cols[None, :]) & (exclude_diag != 0))
        s = tl.where(drop, float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no entry yet: no inf - inf
        l_i = l_i * tl.exp2(m_i - ref) + tl.sum(tl.exp2(s - ref[:, None]), axis=1)
        m_i = m_new
        if cols_on != 0:
            # sum_i 2^(s_ij - c_j) = 2^(t_j - c_j) sum_i 2^(s_ij - t_j) with t_j = floor(tile max): the
            # exponent arguments stay small (an argument near A would carry A * eps of rounding) and
            # the integer power 2^(t_j - c_j) is built exactly from its bits (0 below 2^-126).
            cref = tl.load(CREF + cols, mask=col_ok, other=0.0)  # integer-valued
            tmax = tl.max(s, axis=0)
            t = tl.where(tmax == float("-inf"), cref, tl.floor(tmax))
            part = tl.sum(tl.exp2(s - t[None, :]), axis=0)
            e = tl.minimum(tl.maximum(t - cref, -127.0), 127.0).to(tl.int32)
            pow2 = ((e + 127) << 23).to(tl.float32, bitcast=True)
            tl.atomic_add(COLSUM + cols, part * pow2, mask=col_ok, sem="relaxed")
    ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    store_ok = row_ok
    if fixup != 0:
        store_ok = row_ok & (end > start)
    tl.store(LSE + tl.cast(split, tl.int64) * N + rows, (ref + tl.log2(l_i)) * 0.6931471805599453, mask=store_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["COLS_PER_SPLIT"])
def _bwd_kernel(Q, K, LSE_R, LSE_C, W_R, W_C, C_R, C_C, DQ, DK, DS_PART, SCALE2, N, M, D, stride_qn, stride_kn,
                exclude_diag, cols_on, N_KEY, M_KEY, COLS_PER_SPLIT,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                DOT_F32: tl.constexpr, GRAD_D: tl.constexpr, DQ_HOLD: tl.constexpr):
    # Grid (row block, column split), as the forward: program (i, c) adds the contributions of
    # its columns to DQ[rows] and DK[cols], both with fp32 atomics (several splits share a row).
    # DQ_HOLD > 0 (a power of two >= D, see _dq_hold): the program's dQ rows stay in a
    # [BLOCK_M, DQ_HOLD] fp32 accumulator across its column loop (FlashAttention-2's loop order)
    # and reach DQ once, one atomic per element per column split. DQ_HOLD = 0 (D too large for the
    # accumulator to fit in registers next to the S tile): one atomic per element per tile.
    scale2 = tl.load(SCALE2)  # scale * log2(e), from device memory
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    r0 = tl.cast(pid * BLOCK_M, tl.int64)  # int64: rows * stride passes 2^31
    Q_blk = Q + r0 * stride_qn
    DQ_blk = DQ + r0 * D  # DQ, DK: contiguous fp32
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, GRAD_D)  # the gradient GEMMs' D chunk (_grad_d), independent of BLOCK_D
    # Rows outside [0, N) get zero weight and -inf logits, so nothing of theirs reaches DQ or DK.
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    w_r = tl.load(W_R + rows, mask=row_ok, other=0.0)
    c_r = tl.load(C_R + rows, mask=row_ok, other=0.0)
    ds = tl.zeros([BLOCK_M], tl.float32)
    if DQ_HOLD > 0:
        offs_h = tl.arange(0, DQ_HOLD)
        h_ok = offs_h < D
        dq_acc = tl.zeros([BLOCK_M, DQ_HOLD], tl.float32)
    start = split * COLS_PER_SPLIT
    end = tl.minimum(M, start + COLS_PER_SPLIT)
    n_cb = tl.cdiv(end - start, BLOCK_N)
    for step in range(0, n_cb):
        # Start each row block at another column block so the DK atomics rarely collide.
        c0 = start + ((pid + step) % n_cb) * BLOCK_N
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        K_blk = K + tl.cast(c0, tl.int64) * stride_kn
        DK_blk = DK + tl.cast(c0, tl.int64) * D
        s = _tile(Q_blk, K_blk, row_ok, col_ok, D, stride_qn, stride_kn,
                  BLOCK_M, BLOCK_N, BLOCK_D, PREC, DOT_F32) * scale2
        g, s_kept = _grad_tile(s, rows, cols, row_ok, col_ok, lse_r, w_r, LSE_C, W_C, exclude_diag, cols_on)
        # dscale = sum_ij G_ij S_ij / scale from the fp32 G (a sum with cancellation: G in the
        # input dtype would cost it the precision the scaling above keeps for dQ and dK).
        ds += tl.sum(g * s_kept, axis=1)
        g_r = (g * c_r[:, None]).to(Q.dtype.element_ty)
        if DQ_HOLD > 0:
            # the whole (zero-padded) width of the K block in one GEMM into the held accumulator,
            # before G^T is formed so that the two are not live (in registers) at once
            kh = tl.load(K_blk + offs_n[:, None] * stride_kn + offs_h[None, :],
                         mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            dq_acc = _dot(g_r, kh, dq_acc, PREC, DOT_F32)
        c_c = tl.load(C_C + cols, mask=col_ok, other=0.0)
        g_c = tl.trans((g * c_c[None, :]).to(Q.dtype.element_ty))
        q_ptr = Q_blk + offs_m[:, None] * stride_qn + offs_d[None, :]
        k_ptr = K_blk + offs_n[:, None] * stride_kn + offs_d[None, :]
        dq_ptr = DQ_blk + offs_m[:, None] * D + offs_d[None, :]
        dk_ptr = DK_blk + offs_n[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, GRAD_D):
            d_ok = d0 + offs_d < D
            q_ok = row_ok[:, None] & d_ok[None, :]
            k_ok = col_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr, mask=q_ok, other=0.0)
            if DQ_HOLD == 0:
                k = tl.load(k_ptr, mask=k_ok, other=0.0)
                dq = _dot(g_r, k, tl.zeros([BLOCK_M, GRAD_D], tl.float32), PREC, DOT_F32)
                tl.atomic_add(dq_ptr, dq, mask=q_ok, sem="relaxed")
            dk = _dot(g_c, q, tl.zeros([BLOCK_N, GRAD_D], tl.float32), PREC, DOT_F32)
            tl.atomic_add(dk_ptr, dk, mask=k_ok, sem="relaxed")
            q_ptr += GRAD_D
            k_ptr += GRAD_D
            dq_ptr += GRAD_D
            dk_ptr += GRAD_D
    if DQ_HOLD > 0:
        tl.atomic_add(DQ_blk + offs_m[:, None] * D + offs_h[None, :], dq_acc,
                      mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")
    tl.store(DS_PART + split * tl.num_programs(0) + pid, tl.sum(ds, axis=0) / scale2)


# --------------------------------------------------------------------------------------------
# Launch configurations: ONE list per (kernel, dtype class); the autotuner and COMPILE_SPECS both
# read it, so every configuration the autotuner may pick is compile-checked for sm_80/sm_90.
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)
CONFIGS = {
    ("fwd", "half"): [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 4)],
    # 8 warps only: with dQ added by atomics (the column-split grid), the 4-warp 64 x 64 tiles and
    # the 3-stage fp32 IEEE tile spilled 16-32 bytes (ptxas -v, sm_90a).
    ("bwd", "half"): [(128, 64, 64, 8, 2), (64, 128, 64, 8, 2), (128, 64, 64, 8, 3)],
    ("fwd", "fp32"): [(64, 64, 32, 4, 2), (128, 64, 32, 8, 2)],
    ("bwd", "fp32"): [(64, 64, 32, 8, 2)],
}
# The backward holding dQ on chip (DQ_HOLD > 0), per (dtype class, PREC, DQ_HOLD): the configs of
# CONFIGS that compile for sm_90 without spilling next to the [BLOCK_M, DQ_HOLD] fp32 accumulator
# under both Triton versions (benchmarks/results/triton_sm90_resources*.md, ptxas -v). The
# half-precision kernels already use all 255 registers: a 64-wide accumulator fits the 64-row
# config (16 more per thread at 8 warps); at 128 rows (32 more) the 2-stage config spilled 16 bytes
# under Triton 3.6 and the 3-stage one 8-16 under 3.8; 128 wide spilled 16-112 bytes in every
# config and 256 wide 220-500 bytes (Triton 3.8). fp32 IEEE spilled at 128 wide, TF32 at 256.
# Wider D keeps the per-tile atomics (DQ_HOLD = 0).
HOLD_CONFIGS = {
    ("half", "tf32", 64): [(64, 128, 64, 8, 2)],
    ("fp32", "ieee", 64): [(64, 64, 32, 8, 2)],
    ("fp32", "tf32", 64): [(64, 64, 32, 8, 2)],
    ("fp32", "tf32", 128): [(64, 64, 32, 8, 2)],
}
_KERNELS = {"fwd": _fwd_kernel, "bwd": _bwd_kernel}
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dclass(dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _config_list(kernel: str, dclass: str, prec: str = "tf32", hold: int = 0) -> list[tuple]:
    return HOLD_CONFIGS[(dclass, prec, hold)] if hold else CONFIGS[(kernel, dclass)]


def _all_bwd_configs(dclass: str) -> list[tuple]:
    """Every config a backward of this dtype class may launch, per-tile and holding dQ."""
    return CONFIGS[("bwd", dclass)] + [c for (dc, _, _), cs in HOLD_CONFIGS.items() if dc == dclass for c in cs]


def _configs(kernel: str, dtype, prec: str = "tf32", hold: int = 0) -> list[dict]:
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=s)
            for bm, bn, bd, w, s in _config_list(kernel, _dclass(dtype), prec, hold)]


def _grad_d(kernel: str, dtype, prec: str) -> dict:
    """The backward's GRAD_D, fixed per (dtype, PREC): the D chunk of its dQ / dK GEMMs. IEEE fp32
    dots are FMA loops at the edge of the register file (255 registers, ptxas -v, sm_90a), and the
    two Triton versions' code generation allocates them differently: 32-wide chunks spilled 16 bytes
    under Triton 3.6 (the GPU machine's) and none under 3.8, 16-wide chunks none under 3.6 and 4
    bytes under 3.8. Each version gets the width that does not spill in its resource report.
    Otherwise the S tile's BLOCK_D (one value per dtype class in CONFIGS)."""
    if kernel != "bwd":
        return {}
    if dtype == torch.float32 and prec == "ieee":
        return {"GRAD_D": 16 if _TRITON_VERSION < (3, 7) else 32}
    return {"GRAD_D": CONFIGS[("bwd", _dclass(dtype))][0][2]}


def _hold_widths(dtype, prec: str) -> list[int]:
    """The widths the backward may hold dQ at for (dtype, PREC), ascending (HOLD_CONFIGS)."""
    return sorted(w for dc, p, w in HOLD_CONFIGS if dc == _dclass(dtype) and p == prec)


def _dq_hold(kernel: str, dtype, prec: str, d: int) -> dict:
    """The backward's DQ_HOLD for a launch of width d (padded to a multiple of 16): the smallest
    held width >= d, or 0 (dQ added per tile) when d is wider than every width that compiles
    without spilling for sm_90 (HOLD_CONFIGS)."""
    if kernel != "bwd":
        return {}
    for w in _hold_widths(dtype, prec):
        if d <= w:
            return {"DQ_HOLD": w}
    return {"DQ_HOLD": 0}


def _prec(dtype) -> str:
    """fp32 inputs follow torch.get_float32_matmul_precision() as torch's matmuls do
    ('highest' -> IEEE fp32 products, 'high'/'medium' -> TF32); half types use the tensor cores."""
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for fp16/bf16 operands
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


_PTR_ARGS = {"fwd": {"Q": "in", "K": "in", "LSE": "f", "COLSUM": "f", "CREF": "f", "FLAGS": "f", "SCALE2": "f"},
             "bwd": {"Q": "in", "K": "in", **{n: "f" for n in ("LSE_R", "LSE_C", "W_R", "W_C", "C_R", "C_C", "DQ", "DK",
                                                               "DS_PART", "SCALE2")}}}
_FLOAT_ARGS = {"col_floor"}


def _constexprs(kernel: str) -> set:
    fn = _KERNELS[kernel].fn  # the Python function (JITFunction and the interpreter's wrapper)
    return {name for name, ann in fn.__annotations__.items() if ann is tl.constexpr}


def _signature(kernel: str, t: str) -> dict:
    """Argument types derived from the kernel's own argument list (pointers, fp32 scalars, i32)."""
    sig = {}
    for name in _KERNELS[kernel].fn.__code__.co_varnames[:_KERNELS[kernel].fn.__code__.co_argcount]:
        if name in _PTR_ARGS[kernel]:
            sig[name] = f"*{t}" if _PTR_ARGS[kernel][name] == "in" else "*fp32"
        elif name in _constexprs(kernel):
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


_ALIGNED = ("D", "stride_qn", "stride_kn")


def _aligned_attrs(sig: dict) -> dict:
    """The specialisation every launch gets (see _kernel_layout, _vec): pointers 16-byte aligned,
    D and the row strides divisible by 16; the other integers are not specialised."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or name in _ALIGNED}


# (input dtype, PREC) of every launch: _prec gives "tf32" for half inputs (tl.dot ignores it there)
# and "ieee" or "tf32" for fp32 by torch.get_float32_matmul_precision(); DOT_F32 is False on a GPU.
_LAUNCH_VARIANTS = [(torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "ieee"),
                    (torch.float32, "tf32")]


def _specs() -> list[CompileSpec]:
    specs = []
    for kernel in ("fwd", "bwd"):
        for dtype, prec in _LAUNCH_VARIANTS:
            t = _TL[dtype]
            for hold in _hold_variants(kernel, dtype, prec):
                for cfg in _configs(kernel, dtype, prec, hold.get("DQ_HOLD", 0)):
                    cx = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PREC=prec,
                              DOT_F32=False, **_grad_d(kernel, dtype, prec), **hold)
                    tag = (f"{t}{'_' + prec if dtype == torch.float32 else ''}_m{cfg['BLOCK_M']}_n{cfg['BLOCK_N']}"
                           f"_d{cfg['BLOCK_D']}_w{cfg['num_warps']}_s{cfg['num_stages']}"
                           f"{'_hold' + str(hold['DQ_HOLD']) if hold.get('DQ_HOLD') else ''}")
                    sig = _signature(kernel, t)
                    specs.append(CompileSpec(f"contrastive_lse_{kernel}_{tag}", _KERNELS[kernel], sig, cx,
                                             cfg["num_warps"], cfg["num_stages"], _aligned_attrs(sig)))
    return specs


def _hold_variants(kernel: str, dtype, prec: str) -> list[dict]:
    """Every DQ_HOLD constexpr dict _dq_hold may give (the per-tile DQ_HOLD = 0 first)."""
    if kernel != "bwd":
        return [{}]
    return [{"DQ_HOLD": 0}] + [{"DQ_HOLD": w} for w in _hold_widths(dtype, prec)]


COMPILE_SPECS: list[CompileSpec] = _specs()


# ---- choosing a configuration ---------------------------------------------------------------
# triton.autotune times every config (full launches) once per distinct key. Keyed on the exact N
# and M it would re-tune for every new batch size - 5 configs x several runs, seconds at N = 65536.
# The key holds power-of-two buckets of N and M instead: what decides the best tile is how many
# row blocks there are per SM wave and how long each program's column loop is, and both change by
# factors, not by units. Buckets stop at _TUNE_MAX_ROWS: a launch that large has many waves of
# programs (65536 / 128 = 512 row blocks on 132 SMs) whatever the tile, so it takes the config tuned
# at the top bucket when that bucket was tuned in this process, else the first config of its list
# (the fixed large-size choice) - never a tuning run of a launch that itself takes up to seconds.
# Tuners are per (kernel, dtype class, PREC, device): tuned configs are cached per device.
# FIXED_CONFIG_ENV=1 turns tuning off everywhere (the first config of each list): the GPU test run
# checks values, and every config is compile-checked for sm_80/sm_90 elsewhere.
_TUNE_MAX_ROWS = 65536
FIXED_CONFIG_ENV = "DGKERNELS_TRITON_FIXED_CONFIG"
_TUNED_KEYS: set = set()  # (device, kernel, dclass, prec, N_KEY, M_KEY, D, cols_on, fixup) tuned so far


def _bucket(n: int) -> int:
    """The autotuner's size key: the next power of two, at most _TUNE_MAX_ROWS."""
    return min(triton.next_power_of_2(max(int(n), 1)), _TUNE_MAX_ROWS)


def _fixed_config() -> bool:
    return os.environ.get(FIXED_CONFIG_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, dclass: str, prec: str = "tf32", device: int = 0, hold: int = 0):
    """The kernel wrapped in triton.autotune over its configs (GPU only), one per device, PREC and
    DQ_HOLD so that none shares another's tuned choice (a held dQ has its own config list)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
               for bm, bn, bd, w, s in _config_list(kernel, dclass, prec, hold)]
    # Accumulated outputs: zeroed before every trial so no config sees another's partial sums.
    reset = ["COLSUM"] if kernel == "fwd" else ["DQ", "DK", "DS_PART"]
    key = ["N_KEY", "M_KEY", "D", "cols_on"] + (["fixup"] if kernel == "fwd" else [])
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(
        _KERNELS[kernel])


def autotune_launches():
    """(autotuner, signature, launcher-fixed constexprs) for every way _launch calls an autotuner on
    a GPU: tests/test_triton_compile.py expands these over the autotuner's own configs and checks
    they equal COMPILE_SPECS, so every config it may pick is compiled and in the resource report."""
    launched = {(dtype, prec) for dtype in _TL for prec in _prec_choices(dtype)}
    if launched != set(_LAUNCH_VARIANTS):
        raise AssertionError(f"_LAUNCH_VARIANTS {_LAUNCH_VARIANTS} differ from what _prec launches: {launched}")
    for kernel in ("fwd", "bwd"):
        for dtype, prec in _LAUNCH_VARIANTS:
            for hold in _hold_variants(kernel, dtype, prec):
                yield (_tuned(kernel, _dclass(dtype), prec, 0, hold.get("DQ_HOLD", 0)), _signature(kernel, _TL[dtype]),
                       dict(PREC=prec, DOT_F32=False, **_grad_d(kernel, dtype, prec), **hold))


def _prec_choices(dtype) -> set:
    """Every PREC _prec can return for dtype (over all float32 matmul precisions)."""
    saved = torch.get_float32_matmul_precision()
    try:
        out = set()
        for p in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(p)
            out.add(_prec(dtype))
        return out
    finally:
        torch.set_float32_matmul_precision(saved)


# ---- the grid: row blocks x column splits ----------------------------------------------------
# One program per row block alone leaves an H100 (132 SMs) mostly idle at the batch sizes CLIP
# trains with: N = 4096 is 32-64 row blocks. The column range is therefore split too, so that
# there are about _TARGET_WAVES programs per SM: the forward combines the splits' partial row
# log-sum-exps (O(splits N) on the host side, exact), the backward adds the splits' dQ with fp32
# atomics as it adds dK. A split keeps at least _MIN_SPLIT_COLS columns, so that each program still
# amortises loading its Q block over a column block or more; large N needs no split (N = 65536:
# 512-1024 row blocks, 4-8 waves). Grids at N = M: benchmarks/results/gpu_roofline.md.
_SPLIT_ALIGN = 128  # a split is a whole number of column blocks of every config (BLOCK_N <= 128)
_MIN_SPLIT_COLS = 128
_TARGET_WAVES = 2
_DEFAULT_SMS = 132  # H100/H200; the interpreter and CPU callers plan for that GPU


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def column_split(n: int, m: int, device=None) -> tuple[int, int]:
    """(number of column splits, columns per split) of a launch over n rows and m columns."""
    on_gpu = device is not None and device.type == "cuda" and not _interpret()
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if on_gpu \
        else _DEFAULT_SMS
    fewest_row_blocks = max(1, triton.cdiv(n, max(c[0] for cfgs in CONFIGS.values() for c in cfgs)))
    want = triton.cdiv(_TARGET_WAVES * sms, fewest_row_blocks)
    splits = max(1, min(want, m // _MIN_SPLIT_COLS))
    cols = triton.cdiv(triton.cdiv(max(m, 1), splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(max(m, 1), cols), cols


def _launch(kernel: str, n: int, args: tuple, dtype, m: int | None = None, device=None, split=(1, 0)):
    """Launch `kernel` over (ceil(n / BLOCK_M) row blocks, split[0] column splits of split[1]
    columns); args end with (..., N_KEY, M_KEY, COLS_PER_SPLIT) filled here from n, m (the
    column count; n when absent) and split."""
    prec = _prec(dtype)
    m = n if m is None else m
    n_key, m_key = _bucket(n), _bucket(m)
    splits, cols = split
    args = args + (n_key, m_key, cols if splits > 1 else max(m, 1))
    interp = _interpret()
    dev = 0 if interp or device is None or device.index is None else device.index
    cols_on, d = args[_ARG_INDEX[kernel]["cols_on"]], args[_ARG_INDEX[kernel]["D"]]
    fixup = args[_ARG_INDEX[kernel]["fixup"]] if kernel == "fwd" else 0
    hold = _dq_hold(kernel, dtype, prec, d)
    key = (dev, kernel, _dclass(dtype), prec, n_key, m_key, d, cols_on, fixup)
    oversize = n > _TUNE_MAX_ROWS or m > _TUNE_MAX_ROWS
    if interp or _fixed_config() or (oversize and key not in _TUNED_KEYS):
        # The interpreter cannot time configs; tests and oversize first launches take the first one.
        cfg = _configs(kernel, dtype, prec, hold.get("DQ_HOLD", 0))[0]
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), splits)
        _KERNELS[kernel][grid](*args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                               PREC=prec, DOT_F32=interp and dtype == torch.bfloat16, **_grad_d(kernel, dtype, prec),
                               **hold,
                               **({} if interp else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
        return
    tuned = _tuned(kernel, _dclass(dtype), prec, dev, hold.get("DQ_HOLD", 0))
    tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)](*args, PREC=prec, DOT_F32=False,
                                                                  **_grad_d(kernel, dtype, prec), **hold)
    _TUNED_KEYS.add(key)


def _arg_index(kernel: str) -> dict:
    fn = _KERNELS[kernel].fn
    return {name: i for i, name in enumerate(fn.__code__.co_varnames[:fn.__code__.co_argcount])}


_ARG_INDEX = {k: _arg_index(k) for k in _KERNELS}


_MAX_BLOCK = max(max(c[0], c[1]) for cfgs in CONFIGS.values() for c in cfgs)


def _kernel_layout(t):
    """The layout every launch has (and COMPILE_SPECS compiles): unit stride along D, D, the row
    stride and the address 16-aligned (vectorised loads), in-block offsets (BLOCK rows * row
    stride) within int32 (the kernels add them to an int64 block base). Anything else is copied
    once into a zero-padded [rows, ceil16(D)] buffer: O(rows * D), and zeros change no dot product."""
    n, d = t.shape
    dp = -(-d // 16) * 16
    if (d == dp and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
            and t.stride(0) * _MAX_BLOCK + dp < 2 ** 31):
        return t
    out = t.new_zeros(n, dp)
    out[:, :d] = t
    return out


def _vec(t):
    """A contiguous fp32 vector at a 16-byte aligned address (the launch specialisation)."""
    t = t.float().contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _rows_lse(q, k, scale2, exclude_diag, colsum=None, cref=None, flags=None):
    """Row log-sum-exp of q against k; with colsum/cref also the fixed-reference column sums;
    with flags (the transposed re-run) only the row blocks holding a flagged row."""
    n, m = q.shape[0], k.shape[0]
    q, k = _kernel_layout(q), _kernel_layout(k)
    d = q.shape[1]
    split = column_split(n, m, q.device)
    out = torch.empty(split[0], n, dtype=torch.float32, device=q.device)
    dummy = out[0, :1]
    args = (q, k, out, dummy if colsum is None else colsum, dummy if cref is None else cref,
            dummy if flags is None else flags, scale2, n, m, d, q.stride(0), k.stride(0), int(exclude_diag),
            int(colsum is not None), int(flags is not None), _COL_FLOOR)
    _launch("fwd", n, args, q.dtype, m=m, device=q.device, split=split)
    # the splits' partial log-sum-exps (-inf where a split had no column of a row) combine exactly
    return out[0] if split[0] == 1 else torch.logsumexp(out, dim=0)


def _norms(t):
    return torch.linalg.vector_norm(t.float(), dim=1)


def _scale2(scale):
    """scale * log2(e) as a [1] fp32 device tensor (the kernels load it): the product is formed in
    float64 and rounded once, the value a Python-float scale2 argument had; a fresh allocation, so
    16-byte aligned as COMPILE_SPECS assumes for every pointer. No host read of the scale."""
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise TypeError(f"scale must be a one-element tensor, got {type(scale).__name__}"
                        f"{'' if not isinstance(scale, torch.Tensor) else ' of shape ' + str(tuple(scale.shape))}")
    return (scale.detach().reshape(1).double() * LOG2E).float()


def lse_forward(q, k, scale, exclude_diag: bool, want_cols: bool):
    """scale: a one-element tensor on q's device (read by the kernels, never on the host)."""
    if q.shape[0] >= 2 ** 39:
        raise ValueError(f"the triton backend sums at most 2^39 rows per column, got {q.shape[0]}")
    scale2 = _scale2(scale)
    if not want_cols:
        return _rows_lse(q, k, scale2, exclude_diag), q.new_empty(0, dtype=torch.float32)
    # Per-column fixed reference (log2 units, an integer): Cauchy-Schwarz bound minus the headroom A.
    cref = torch.floor(scale2 * _norms(q).amax() * _norms(k)) - _COL_HEADROOM
    colsum = torch.zeros(k.shape[0], dtype=torch.float32, device=q.device)
    lse_r = _rows_lse(q, k, scale2, exclude_diag, colsum=colsum, cref=cref)
    exact = _rows_lse(k, q, scale2, exclude_diag, flags=colsum)  # only blocks with an underflowed sum
    # NaN sums keep their NaN (not < floor); underflowed ones take the exact re-run.
    # log2(sum) as exponent + log2(mantissa): the integer parts add exactly (log2 of a sum near 2^88
    # in fp32 would be off by ulp(88) ~ 8e-6).
    mant, expo = torch.frexp(colsum)
    lse_c = torch.where(colsum < _COL_FLOOR, exact, ((cref + expo) + torch.log2(mant)) / LOG2E)
    return lse_r, lse_c


def _pow2_scale(w_own, w_other_max):
    """2^(_G_TOP - ceil(log2(|w_own| + max|w_other|))): exact powers of two bounding the scaled G."""
    bound = w_own.abs() + w_other_max
    e = torch.ceil(torch.log2(bound)).clamp(-110.0, 128.0)  # the scale stays a normal fp32; 0 -> 2^125
    return torch.exp2(_G_TOP - e)


def lse_backward(q, k, scale, exclude_diag: bool, lse_r, lse_c, w_r, w_c):
    n, d0 = q.shape
    m = k.shape[0]
    q, k = _kernel_layout(q), _kernel_layout(k)
    d = q.shape[1]  # padded to a multiple of 16
    cols = w_c is not None
    if not cols:  # unused statistics still need valid [M] buffers (the kernel skips them by flag)
        lse_c = w_c = torch.zeros(m, dtype=torch.float32, device=k.device)
    w_r, w_c = _vec(w_r), _vec(w_c)
    c_r = _pow2_scale(w_r, w_c.abs().amax())
    c_c = _pow2_scale(w_c, w_r.abs().amax())
    lse_r, lse_c = _vec(lse_r), _vec(lse_c)
    from . import triton_slab  # imported here: it builds on this module's kernels and helpers

    if triton_slab.wanted(d, _dq_hold("bwd", q.dtype, _prec(q.dtype), d)["DQ_HOLD"], m):
        dq, dk, ds = triton_slab.lse_backward(q, k, _scale2(scale), exclude_diag, lse_r, lse_c, w_r, w_c, c_r, c_c,
                                              cols)
    else:
        dq = torch.zeros(n, d, dtype=torch.float32, device=q.device)
        dk = torch.zeros(m, d, dtype=torch.float32, device=q.device)
        split = column_split(n, m, q.device)
        # one partial dscale per program at the smallest BLOCK_M (the autotuner may pick any config)
        ds_part = torch.zeros(split[0] * triton.cdiv(n, min(c[0] for c in _all_bwd_configs(_dclass(q.dtype)))),
                              dtype=torch.float32, device=q.device)
        args = (q, k, lse_r, lse_c, w_r, w_c, c_r, c_c, dq, dk, ds_part, _scale2(scale), n, m, d,
                q.stride(0), k.stride(0), int(exclude_diag), int(cols))
        _launch("bwd", n, args, q.dtype, m=m, device=q.device, split=split)
        ds = ds_part.sum()
    dq.div_(c_r[:, None])  # G K (exact: c_r is a power of two)
    dk.div_(c_c[:, None])
    s = scale.detach().reshape(()).float()  # on the device: a 0-d tensor operand, no host read
    return dq[:, :d0].mul_(s), dk[:, :d0].mul_(s), ds
