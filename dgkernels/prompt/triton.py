"""Triton backend of the prompt ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Kernels
  _assemble_kernel       out[t] = src[src_index[t]].to(out) + pos[pos_index[t]] (pos pre-cast, [C, W])
  _index_add_rows_kernel out[index[t]] += grad[t] in float32 (atomics; backward of the gathers)
  _attn_fwd_kernel       shared-prefix causal attention, one program per (64-row window, head):
                         online softmax over the group's prefix key blocks, then the window's
                         suffix keys under a block-diagonal causal mask
  _attn_bwd_dq_kernel    dq per (window, head), recomputing P from the saved lse
                         (delta = rowsum(do * o) precomputed once for both backward kernels)
  _attn_bwd_dkv_kernel   dk/dv per (key window, head) over [keys, queries] tiles; prefix key blocks
                         per (query window, head) add into the group's float32 dkp/dvp with atomics
  _head_fwd_kernel       EOT gather + LayerNorm (float32) + projection (tl.dot) + L2 normalisation
  _head_bwd_gz_kernel    backward of the normalisation; the two GEMMs of the projection backward
                         run in torch (cuBLAS), then
  _head_bwd_ln_kernel    LayerNorm backward scattered straight into the EOT rows of dx

Why packed windows (packing.py). Hopper's wgmma needs 64 rows per warp group in every dot; one
class-name suffix is 3-10 tokens. A 64-row query block per sequence (the simple alternative)
would leave 85-95% of the rows idle. Instead the sequences of one prefix group are packed into
64-row windows: q @ kp^T over the group's shared prefix is a dense [64, Lp] GEMM, and the suffix
keys of a window ([first row of its first sequence, end of the window)) form a block-diagonal
causal mask from a per-row sequence table. The tables are built per call with device tensor ops
(no host synchronisation; in the encoder's layout the row permutation is the identity).
What it wastes (CoOp: Lp = 17, suffixes of L ~ 8 tokens): every window row is a real query,
but a window's suffix tile is [64, ~96] of which ~L/2 keys per row are visible, and the prefix
block pads 17 keys to 32, so ~17% of the fwd/dq score tile is useful (the 16-row per-sequence
blocks this replaces: ~22%, on mma.sync, with 4-8x more programs); the dk/dv prefix programs pad
17 prefix keys to a 64-row tile (27% useful). fp32 keeps 16-row windows (no wgmma needed; 64-row
fp32 tiles spill). GPU speed: benchmarks/gpu_bench.py; the sm_90
compile's registers, spills and wgmma are in benchmarks/results/triton_sm90_resources.md.

Float64 is not a Triton path here (the cpp/cuda and reference backends take it). Head dims up to
128 (ViT-B/L text towers: 64). Every launch configuration is in COMPILE_SPECS.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._triton_signature import CompileSpec
from .._triton_signature import interpreting, param_names, signature
from .packing import Windows, cached_windows

BLOCK_DS = (16, 32, 64, 128)  # head-dim blocks
HEAD_BLOCK_N, HEAD_BLOCK_K, HEAD_BLOCK_E = 16, 64, 64
HEAD_FWD_WARPS = 8  # 4 warps spilled on sm_90 (255 registers); 8: 178, no spill
HEAD_FWD_STAGES = 2  # 3 stages spilled 8-12 bytes at 8 warps under Triton 3.6 (the GPU machine's)
_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


def _attn_blocks(dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the attention kernels: the window of packed rows each program owns
    and the inner block it streams (keys in fwd/dq, queries in dkv)."""
    if dtype == torch.float32:
        return ATTN_BLOCKS_FP32
    return ATTN_BLOCKS_HALF


ATTN_BLOCKS_HALF = (64, 32)  # 64 rows: one wgmma tile per warp group
ATTN_BLOCKS_FP32 = (16, 16)  # fp32 needs no wgmma; 64 x 32 fp32 tiles spilled (dq ieee D64: 536 B)


def _attn_launch(kernel: str, dtype, block_d: int) -> dict:
    """num_warps / num_stages of an attention kernel, from ptxas -v on sm_90 (the aligned
    specialisation, _attn_attrs). Half, 64 x 32 tiles: 4 warps, 2 stages (at most 224 registers),
    except dk/dv of 128 head dims (4 warps: 255 registers and 200 B spilled; 8 warps: none).
    fp32, 16 x 16 tiles, 4 warps: dq with 1 stage (2 stages spilled 4 B at D32/D128 tf32, 3 at
    D16 tf32; 1: at most 128 registers), fwd and dk/dv with 2 (at most 152)."""
    if dtype == torch.float32:
        # The fp32 16 x 16 tiles spill a few bytes at low register counts in ptxas, differently under
        # each Triton: these are the stage counts without a spill under Triton 3.6 (the GPU
        # machine's: fwd 1, dq 2) and 3.8 (dq 1, fwd 2), each checked by its resource report.
        if _TRITON_VERSION < (3, 7):
            return dict(num_warps=4, num_stages=1 if kernel == "fwd" else 2)
        return dict(num_warps=4, num_stages=1 if kernel == "dq" else 2)
    if kernel == "dkv" and block_d >= 128:
        return dict(num_warps=8, num_stages=2)
    return dict(num_warps=4, num_stages=2)


ROW_BLOCK_W = 256  # column block of the row-copy kernels
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---------------------------------------------------------------------------------------------
# assembly and its backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _assemble_kernel(SRC, SIDX, POS, PIDX, OUT, W, BLOCK_W: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = cols < W
    s = tl.load(SIDX + r).to(tl.int64)
    p = tl.load(PIDX + r).to(tl.int64)
    # round src to the output dtype first (as open_clip casts before adding), add in float32
    a = tl.load(SRC + s * W + cols, mask=ok, other=0.0).to(OUT.dtype.element_ty).to(tl.float32)
    b = tl.load(POS + p * W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + r.to(tl.int64) * W + cols, (a + b).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _index_add_rows_kernel(G, IDX, OUT, W, BLOCK_W: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = cols < W
    i = tl.load(IDX + r).to(tl.int64)
    g = tl.load(G + r.to(tl.int64) * W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(OUT + i * W + cols, g, mask=ok)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, WIDEN: tl.constexpr):
    # WIDEN only under TRITON_INTERPRET with bfloat16: the interpreter's tl.dot misreads bfloat16
    # operands, so they are widened first (exact: bf16 products fit in float32).
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_rows_scaled(ds, b, PREC: tl.constexpr, WIDEN: tl.constexpr):
    """ds [M, N] (float32) @ b [N, D] with ds cast to b's dtype row-scaled: row i is divided by
    its largest magnitude s_i before the cast and the product row multiplied by s_i afterwards
    (exact in exact arithmetic). Gradients of a loss averaged over a large batch are of order
    1e-8 and would flush to fp16 subnormals; scaled they keep fp16's relative precision."""
    s = tl.max(tl.abs(ds), axis=1)
    s = tl.where(s > 0, s, 1.0)
    return _dot((ds / s[:, None]).to(b.dtype), b, PREC, WIDEN) * s[:, None]


@triton.jit
def _window(WIN, w, LAST: tl.constexpr):
    """Row w of the window table (packing.py): w0, w1, the prefix group (int64: it scales the
    prefix strides) and column LAST (3 = kfirst for query windows, 4 = qlast for key windows)."""
    w0 = tl.load(WIN + w * 5 + 0)
    w1 = tl.load(WIN + w * 5 + 1)
    g = tl.load(WIN + w * 5 + 2).to(tl.int64)
    return w0, w1, g, tl.load(WIN + w * 5 + LAST)


# ---------------------------------------------------------------------------------------------
# shared-prefix attention over packed row windows (packing.py builds ROW / SEQ / WIN)
# ---------------------------------------------------------------------------------------------
# Derivation. Packed rows i (queries) and j (keys) of one group g; s_ij = scale * q_i . k_j over
# the Lp prefix keys (all visible) and the suffix keys with seq[j] == seq[i], j <= i.
#   forward  o_i = sum_j p_ij v_j,  p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
#            (online softmax: running max m_i and sum l_i over key blocks, prefix first).
#   backward with delta_i = do_i . o_i:  dp_ij = do_i . v_j,  ds_ij = p_ij (dp_ij - delta_i),
#            dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i.
# A program owns BLOCK_M = window packed rows: the queries of the forward and dq kernels, the keys
# of the dkv kernel, whose tiles are therefore computed transposed ([keys, queries]: s^T = k q^T)
# so every tl.dot has BLOCK_M = 64 rows (wgmma). Queries of a window: [w0, w1); its suffix keys:
# [kfirst, w1) (block-diagonal causal mask); the queries of a key window: [w0, qlast). Padding rows
# carry seq = -1 (queries) / -2 (keys), so they never match.
@triton.jit
def _attn_fwd_kernel(Q, K, V, KP, VP, OUT, LSE, ROW, SEQ, WIN,
                     s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_kpg, s_kpl, s_kph, s_vpg, s_vpl, s_vph,
                     H, LP, DIM, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     WIDEN: tl.constexpr):
    w = tl.program_id(0)
    h = tl.program_id(1)
    w0, w1, g, kfirst = _window(WIN, w, 3)
    if w0 < w1:
        offs_m = w0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < w1
        d_ok = offs_d < DIM
        rows = tl.load(ROW + offs_m, mask=m_ok, other=0).to(tl.int64)
        seq_m = tl.load(SEQ + offs_m, mask=m_ok, other=-1)
        q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # keys of the shared prefix: all visible
        for n0 in range(0, LP, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < LP
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(KP + g * s_kpg + cols[:, None] * s_kpl + h * s_kph + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(VP + g * s_vpg + cols[:, None] * s_vpl + h * s_vph + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, WIDEN) * scale
            s = tl.where(c_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, WIDEN)
            m_i = m_new
        # suffix keys of the window's sequences, block-diagonal causal
        for n0 in range(kfirst, w1, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < w1
            krow = tl.load(ROW + cols, mask=c_ok, other=0).to(tl.int64)
            seq_n = tl.load(SEQ + cols, mask=c_ok, other=-2)
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(K + krow[:, None] * s_kt + h * s_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + krow[:, None] * s_vt + h * s_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, WIDEN) * scale
            vis = (seq_n[None, :] == seq_m[:, None]) & (cols[None, :] <= offs_m[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, WIDEN)
            m_i = m_new
        l_i = tl.where(m_ok, l_i, 1.0)  # padding rows: not stored, kept finite
        acc = acc / l_i[:, None]
        tl.store(OUT + rows[:, None] * (H * DIM) + h * DIM + offs_d[None, :], acc.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + rows * H + h, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, KP, VP, DELTA, DO, LSE, DQ, ROW, SEQ, WIN,
                        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_kpg, s_kpl, s_kph, s_vpg, s_vpl, s_vph,
                        H, LP, DIM, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                        WIDEN: tl.constexpr):
    w = tl.program_id(0)
    h = tl.program_id(1)
    w0, w1, g, kfirst = _window(WIN, w, 3)
    if w0 < w1:
        offs_m = w0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < w1
        d_ok = offs_d < DIM
        qmask = m_ok[:, None] & d_ok[None, :]
        rows = tl.load(ROW + offs_m, mask=m_ok, other=0).to(tl.int64)
        seq_m = tl.load(SEQ + offs_m, mask=m_ok, other=-1)
        q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + rows[:, None] * (H * DIM) + h * DIM + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + rows * H + h, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + rows * H + h, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, LP, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < LP
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(KP + g * s_kpg + cols[:, None] * s_kpl + h * s_kph + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(VP + g * s_vpg + cols[:, None] * s_vpl + h * s_vph + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, WIDEN) * scale
            p = tl.where(c_ok[None, :] & m_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PREC, WIDEN)
            ds = p * (dp - delta[:, None])
            dq += _dot_rows_scaled(ds, k, PREC, WIDEN)
        for n0 in range(kfirst, w1, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < w1
            krow = tl.load(ROW + cols, mask=c_ok, other=0).to(tl.int64)
            seq_n = tl.load(SEQ + cols, mask=c_ok, other=-2)
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(K + krow[:, None] * s_kt + h * s_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + krow[:, None] * s_vt + h * s_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, WIDEN) * scale
            vis = (seq_n[None, :] == seq_m[:, None]) & (cols[None, :] <= offs_m[:, None])
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PREC, WIDEN)
            ds = p * (dp - delta[:, None])
            dq += _dot_rows_scaled(ds, k, PREC, WIDEN)
        tl.store(DQ + rows[:, None] * (H * DIM) + h * DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=qmask)


@triton.jit
def _attn_bwd_dkv_kernel(Q, K, V, KP, VP, DELTA, DO, LSE, DK, DV, DKP, DVP, ROW, SEQ, WIN,
                         s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_kpg, s_kpl, s_kph, s_vpg, s_vpl, s_vph,
                         H, LP, DIM, scale, n_win,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                         WIDEN: tl.constexpr):
    # programs [0, n_win): the suffix keys of window w against the queries [w0, qlast);
    # programs n_win * (1 + b) + w: prefix keys [b * BLOCK_M, (b + 1) * BLOCK_M) of w's group against
    # the queries [w0, w1), added into the group's float32 dkp/dvp (atomics: windows share a prefix)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    w = pid % n_win
    kb = pid // n_win - 1
    is_prefix = kb >= 0
    w0, w1, g, qlast = _window(WIN, w, 4)
    if w0 < w1:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < DIM
        if is_prefix:
            kidx = kb * BLOCK_M + tl.arange(0, BLOCK_M)
            k_ok = kidx < LP
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(KP + g * s_kpg + kidx[:, None] * s_kpl + h * s_kph + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(VP + g * s_vpg + kidx[:, None] * s_vpl + h * s_vph + offs_d[None, :], mask=kv_mask, other=0.0)
            krow = (g * LP + kidx).to(tl.int64)  # row of dkp/dvp viewed as [G * LP, H, DIM]
            seq_k = tl.full([BLOCK_M], -3, tl.int32)
            q_hi = w1
        else:
            kidx = w0 + tl.arange(0, BLOCK_M)
            k_ok = kidx < w1
            kv_mask = k_ok[:, None] & d_ok[None, :]
            krow = tl.load(ROW + kidx, mask=k_ok, other=0).to(tl.int64)
            seq_k = tl.load(SEQ + kidx, mask=k_ok, other=-2)
            k = tl.load(K + krow[:, None] * s_kt + h * s_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + krow[:, None] * s_vt + h * s_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            q_hi = qlast
        dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for m0 in range(w0, q_hi, BLOCK_N):
            qi = m0 + offs_n
            q_ok = qi < q_hi
            qmask = q_ok[:, None] & d_ok[None, :]
            rows = tl.load(ROW + qi, mask=q_ok, other=0).to(tl.int64)
            seq_q = tl.load(SEQ + qi, mask=q_ok, other=-1)
            q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=qmask, other=0.0)
            do = tl.load(DO + rows[:, None] * (H * DIM) + h * DIM + offs_d[None, :], mask=qmask, other=0.0)
            lse = tl.load(LSE + rows * H + h, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + rows * H + h, mask=q_ok, other=0.0)
            st = _dot(k, tl.trans(q), PREC, WIDEN) * scale  # [keys, queries]
            causal = (seq_k[:, None] == seq_q[None, :]) & (kidx[:, None] <= qi[None, :])
            vis = k_ok[:, None] & q_ok[None, :] & (is_prefix | causal)
            pt = tl.where(vis, tl.exp(st - lse[None, :]), 0.0)
            dpt = _dot(v, tl.trans(do), PREC, WIDEN)
            dst = pt * (dpt - delta[None, :])
            dv += _dot(pt.to(do.dtype), do, PREC, WIDEN)
            dk += _dot_rows_scaled(dst, q, PREC, WIDEN)  # one scale per key, as dk's rows
        dk = dk * scale
        dst_off = krow[:, None] * (H * DIM) + h * DIM + offs_d[None, :]
        if is_prefix:
            tl.atomic_add(DKP + dst_off, dk, mask=kv_mask)
            tl.atomic_add(DVP + dst_off, dv, mask=kv_mask)
        else:
            tl.store(DK + dst_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + dst_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ---------------------------------------------------------------------------------------------
# EOT head
# ---------------------------------------------------------------------------------------------
@triton.jit
def _head_fwd_kernel(X, ROWS, LNW, LNB, P, PB, OUT, Y, Z, MEAN, RSTD, N, W, E, eps, normalize,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    rows = tl.load(ROWS + offs_n, mask=n_ok, other=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, W, BLOCK_K):
        ck = k0 + offs_k
        x = tl.load(X + rows[:, None] * W + ck[None, :], mask=n_ok[:, None] & (ck[None, :] < W), other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / W
    sq = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, W, BLOCK_K):
        ck = k0 + offs_k
        ok = n_ok[:, None] & (ck[None, :] < W)
        x = tl.load(X + rows[:, None] * W + ck[None, :], mask=ok, other=0.0).to(tl.float32)
        xc = tl.where(ok, x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(sq / W + eps)
    tl.store(MEAN + offs_n, mean, mask=n_ok)
    tl.store(RSTD + offs_n, rstd, mask=n_ok)
    sumsq = tl.zeros([BLOCK_N], tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ce = e0 + offs_e
        e_ok = ce < E
        acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        for k0 in range(0, W, BLOCK_K):
            ck = k0 + offs_k
            k_ok = ck < W
            ok = n_ok[:, None] & k_ok[None, :]
            x = tl.load(X + rows[:, None] * W + ck[None, :], mask=ok, other=0.0).to(tl.float32)
            lw = tl.load(LNW + ck, mask=k_ok, other=0.0)
            lb = tl.load(LNB + ck, mask=k_ok, other=0.0)
            y = tl.where(ok, (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :], 0.0)
            if e0 == 0:
                tl.store(Y + offs_n[:, None] * W + ck[None, :], y, mask=ok)
            pw = tl.load(P + ck[:, None] * E + ce[None, :], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            acc += tl.dot(y, pw, input_precision=PREC)
        acc += tl.load(PB + ce, mask=e_ok, other=0.0)[None, :]
        acc = tl.where(n_ok[:, None] & e_ok[None, :], acc, 0.0)
        tl.store(Z + offs_n[:, None] * E + ce[None, :], acc, mask=n_ok[:, None] & e_ok[None, :])
        sumsq += tl.sum(acc * acc, axis=1)
    den = tl.where(normalize != 0, tl.maximum(tl.sqrt(sumsq), 1e-12), 1.0)
    # Z is re-read below in a different thread layout than the dot's accumulator that stored it:
    # without a barrier a thread could read an element before its writer stored it.
    tl.debug_barrier()
    for e0 in range(0, E, BLOCK_E):
        ce = e0 + offs_e
        ok = n_ok[:, None] & (ce[None, :] < E)
        z = tl.load(Z + offs_n[:, None] * E + ce[None, :], mask=ok, other=0.0)
        tl.store(OUT + offs_n[:, None] * E + ce[None, :], (z / den[:, None]).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _head_bwd_gz_kernel(GO, Z, GZ, N, E, normalize, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    offs_e = tl.arange(0, BLOCK_E)
    sumsq = tl.zeros([BLOCK_N], tl.float32)
    radial = tl.zeros([BLOCK_N], tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ce = e0 + offs_e
        ok = n_ok[:, None] & (ce[None, :] < E)
        z = tl.load(Z + offs_n[:, None] * E + ce[None, :], mask=ok, other=0.0)
        go = tl.load(GO + offs_n[:, None] * E + ce[None, :], mask=ok, other=0.0).to(tl.float32)
        sumsq += tl.sum(z * z, axis=1)
        radial += tl.sum(z * go, axis=1)
    nrm = tl.sqrt(sumsq)
    den = tl.maximum(nrm, 1e-12)
    radial = tl.where(nrm > 1e-12, radial / den, 0.0)  # o . g with o = z / den (the norm's own term)
    for e0 in range(0, E, BLOCK_E):
        ce = e0 + offs_e
        ok = n_ok[:, None] & (ce[None, :] < E)
        z = tl.load(Z + offs_n[:, None] * E + ce[None, :], mask=ok, other=0.0)
        go = tl.load(GO + offs_n[:, None] * E + ce[None, :], mask=ok, other=0.0).to(tl.float32)
        gz = tl.where(normalize != 0, (go - z / den[:, None] * radial[:, None]) / den[:, None], go)
        tl.store(GZ + offs_n[:, None] * E + ce[None, :], gz, mask=ok)


@triton.jit
def _head_bwd_ln_kernel(GY, X, ROWS, LNW, MEAN, RSTD, DX, N, W, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    rows = tl.load(ROWS + offs_n, mask=n_ok, other=0).to(tl.int64)
    mean = tl.load(MEAN + offs_n, mask=n_ok, other=0.0)
    rstd = tl.load(RSTD + offs_n, mask=n_ok, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    m1 = tl.zeros([BLOCK_N], tl.float32)
    m2 = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, W, BLOCK_K):
        ck = k0 + offs_k
        k_ok = ck < W
        ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rows[:, None] * W + ck[None, :], mask=ok, other=0.0).to(tl.float32)
        gy = tl.load(GY + offs_n[:, None] * W + ck[None, :], mask=ok, other=0.0)
        lw = tl.load(LNW + ck, mask=k_ok, other=0.0)
        gh = gy * lw[None, :]
        xh = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        m1 += tl.sum(gh, axis=1)
        m2 += tl.sum(gh * xh, axis=1)
    m1 = m1 / W
    m2 = m2 / W
    for k0 in range(0, W, BLOCK_K):
        ck = k0 + offs_k
        k_ok = ck < W
        ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rows[:, None] * W + ck[None, :], mask=ok, other=0.0).to(tl.float32)
        gy = tl.load(GY + offs_n[:, None] * W + ck[None, :], mask=ok, other=0.0)
        lw = tl.load(LNW + ck, mask=k_ok, other=0.0)
        xh = (x - mean[:, None]) * rstd[:, None]
        dx = rstd[:, None] * (gy * lw[None, :] - m1[:, None] - xh * m2[:, None])
        tl.store(DX + rows[:, None] * W + ck[None, :], dx.to(DX.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# compile specs: every kernel x dtype x block variant the launchers below can use
# ---------------------------------------------------------------------------------------------
def _prec(dtype) -> str:
    """tl.dot input precision: float32 operands as torch.get_float32_matmul_precision() asks
    ('highest' -> IEEE, else TF32); ignored for half-precision operands."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _attn_types(t: str, kernel) -> dict:
    """Pointer/float types of an attention kernel: activations in the input dtype, LSE and the
    prefix gradients float32, window tables int32 (everything else: i32 sizes and strides)."""
    act = {"Q", "K", "V", "KP", "VP", "OUT", "DO", "DQ", "DK", "DV"}
    types = {}
    for name in param_names(kernel):
        if name in act:
            types[name] = f"*{t}"
        elif name in ("LSE", "DELTA", "DKP", "DVP"):
            types[name] = "*fp32"
        elif name in ("ROW", "SEQ", "WIN"):
            types[name] = "*i32"
    types["scale"] = "fp32"
    return signature(kernel, **types)


def _attn_attrs(sig: dict) -> dict:
    """The specialisation a CLIP text tower's launches get from the JIT: pointers 16-byte aligned,
    head dim and strides divisible by 16 (q/k/v are views of the fused qkv projection, [T, 3W]
    with W a multiple of 64; head dims 64). Unaligned shapes (tests' odd head dims) compile to
    scalar loads with more registers: correct, and not the configuration that has to be fast."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or name.startswith("s_") or name == "DIM"}


def _specs() -> list[CompileSpec]:
    specs = []
    for dtype, t in _TL.items():
        for src_t in _TL.values():
            specs.append(CompileSpec(f"prompt_assemble[{src_t}->{t}]", _assemble_kernel,
                                     signature(_assemble_kernel, SRC=f"*{src_t}", SIDX="*i64", POS=f"*{t}",
                                               PIDX="*i64", OUT=f"*{t}"),
                                     {"BLOCK_W": ROW_BLOCK_W}))
        specs.append(CompileSpec(f"prompt_index_add_rows[{t}]", _index_add_rows_kernel,
                                 signature(_index_add_rows_kernel, G=f"*{t}", IDX="*i64", OUT="*fp32"),
                                 {"BLOCK_W": ROW_BLOCK_W}))
        for prec in (("ieee", "tf32") if dtype == torch.float32 else ("tf32",)):
            for block_d in BLOCK_DS:
                block_m, block_n = _attn_blocks(dtype)
                cx = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "PREC": prec, "WIDEN": False}
                for kernel, fn in (("fwd", _attn_fwd_kernel), ("dq", _attn_bwd_dq_kernel),
                                   ("dkv", _attn_bwd_dkv_kernel)):
                    tag = f"{t},{prec}" if dtype == torch.float32 else t
                    sig = _attn_types(t, fn)
                    specs.append(CompileSpec(f"prompt_attn_{kernel}[{tag},D{block_d}]", fn, sig, dict(cx),
                                             **_attn_launch(kernel, dtype, block_d), attrs=_attn_attrs(sig)))
        for prec in ("ieee", "tf32"):
            specs.append(CompileSpec(
                f"prompt_head_fwd[{t},{prec}]", _head_fwd_kernel,
                signature(_head_fwd_kernel, X=f"*{t}", ROWS="*i64", LNW="*fp32", LNB="*fp32", P="*fp32", PB="*fp32",
                          OUT=f"*{t}", Y="*fp32", Z="*fp32", MEAN="*fp32", RSTD="*fp32", eps="fp32"),
                {"BLOCK_N": HEAD_BLOCK_N, "BLOCK_K": HEAD_BLOCK_K, "BLOCK_E": HEAD_BLOCK_E, "PREC": prec},
                num_warps=HEAD_FWD_WARPS, num_stages=HEAD_FWD_STAGES))
        specs.append(CompileSpec(
            f"prompt_head_bwd_gz[{t}]", _head_bwd_gz_kernel,
            signature(_head_bwd_gz_kernel, GO=f"*{t}", Z="*fp32", GZ="*fp32"),
            {"BLOCK_N": HEAD_BLOCK_N, "BLOCK_E": HEAD_BLOCK_E}))
        specs.append(CompileSpec(
            f"prompt_head_bwd_ln[{t}]", _head_bwd_ln_kernel,
            signature(_head_bwd_ln_kernel, GY="*fp32", X=f"*{t}", ROWS="*i64", LNW="*fp32", MEAN="*fp32",
                      RSTD="*fp32", DX=f"*{t}"),
            {"BLOCK_N": HEAD_BLOCK_N, "BLOCK_K": HEAD_BLOCK_K}))
    return specs


COMPILE_SPECS: list[CompileSpec] = _specs()


# ---------------------------------------------------------------------------------------------
# launchers (the primitives of dgkernels.prompt.ops)
# ---------------------------------------------------------------------------------------------
def refusal(primitive: str, call) -> str:
    """The size limit of these kernels (devices and dtypes are declared in dgkernels.prompt): the
    attention takes head sizes up to BLOCK_DS[-1] (a head is one BLOCK_D block)."""
    head_dim = call.size("head_dim")
    if primitive.startswith("prefix_attention") and head_dim is not None and head_dim > BLOCK_DS[-1]:
        return f"the triton prompt attention supports head dims up to {BLOCK_DS[-1]}, got {head_dim}"
    return ""


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _TL:
        raise TypeError(f"the triton backend runs float32/bfloat16/float16; {name} is {t.dtype} "
                        "(use backend='cpp', 'cuda' or 'reference')")


def assemble_fwd(src, src_index, pos, pos_index, dtype):
    _check_dtype("src", src)
    if dtype not in _TL:
        raise TypeError(f"the triton backend runs float32/bfloat16/float16 activations, got {dtype}")
    src = src.contiguous()
    pos = pos.to(dtype).contiguous()  # small [C, W]: cast once, as open_clip casts it
    t, w = src_index.numel(), src.shape[1]
    out = torch.empty(t, w, dtype=dtype, device=src.device)
    if t:
        _assemble_kernel[(t, triton.cdiv(w, ROW_BLOCK_W))](src, src_index.long().contiguous(), pos,
                                                          pos_index.long().contiguous(), out, w, BLOCK_W=ROW_BLOCK_W)
    return out


def index_add_rows(grad, index, rows):
    _check_dtype("grad", grad)
    grad = grad.contiguous()
    w = grad.shape[1]
    out = torch.zeros(rows, w, dtype=torch.float32, device=grad.device)
    if grad.shape[0]:
        _index_add_rows_kernel[(grad.shape[0], triton.cdiv(w, ROW_BLOCK_W))](grad, index.long().contiguous(), out, w,
                                                                            BLOCK_W=ROW_BLOCK_W)
    return out


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(dim: int) -> int:
    for b in BLOCK_DS:
        if dim <= b:
            return b
    raise ValueError(f"the triton prompt attention supports head dims up to {BLOCK_DS[-1]}, got {dim}")


def _attn_meta(dtype, dim, kernel) -> dict:
    widen = dtype == torch.bfloat16 and interpreting()
    block_m, block_n = _attn_blocks(dtype)
    block_d = _block_d(dim)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=_prec(dtype), WIDEN=widen,
                **_attn_launch(kernel, dtype, block_d))


def _attn_common(q, k, v, kp, vp):
    for name, t in (("q", q), ("k", k), ("v", v), ("kp", kp), ("vp", vp)):
        _check_dtype(name, t)
    q, k, v, kp, vp = (_unit_last(t) for t in (q, k, v, kp, vp))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2))
    return q, k, v, kp, vp, strides


def _windows(q, kp, seq_start, seq_len, seq_group) -> Windows:
    return cached_windows(seq_start, seq_len, seq_group, q.shape[0], kp.shape[0], _attn_blocks(q.dtype)[0])


def attention_fwd(q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale):
    # max_len is not needed: the windows (packing.py) bound every loop
    q, k, v, kp, vp, strides = _attn_common(q, k, v, kp, vp)
    t, heads, dim = q.shape
    out = torch.empty(t, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, heads, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    win = _windows(q, kp, seq_start, seq_len, seq_group)
    _attn_fwd_kernel[(win.count, heads)](q, k, v, kp, vp, out, lse, win.row, win.seq, win.table, *strides, heads,
                                         kp.shape[1], dim, float(scale), **_attn_meta(q.dtype, dim, "fwd"))
    return out, lse


def attention_bwd(grad_out, q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group, max_len, scale):
    q, k, v, kp, vp, strides = _attn_common(q, k, v, kp, vp)
    t, heads, dim = q.shape
    g, lp = kp.shape[0], kp.shape[1]
    do = grad_out.to(q.dtype).contiguous()
    out = out.contiguous()
    # delta_i = do_i . o_i (the softmax backward's row term), once per row for both kernels
    delta = (do.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty_like(out)
    dk = torch.empty_like(out)
    dv = torch.empty_like(out)
    dkp = torch.zeros(g, lp, heads, dim, dtype=torch.float32, device=q.device)
    dvp = torch.zeros_like(dkp)
    if t:
        win = _windows(q, kp, seq_start, seq_len, seq_group)
        tables = (win.row, win.seq, win.table)
        _attn_bwd_dq_kernel[(win.count, heads)](q, k, v, kp, vp, delta, do, lse, dq, *tables, *strides, heads, lp,
                                                dim, float(scale), **_attn_meta(q.dtype, dim, "dq"))
        block_m = _attn_blocks(q.dtype)[0]
        _attn_bwd_dkv_kernel[(win.count * (1 + triton.cdiv(lp, block_m)), heads)](
            q, k, v, kp, vp, delta, do, lse, dk, dv, dkp, dvp, *tables, *strides, heads, lp, dim, float(scale),
            win.count, **_attn_meta(q.dtype, dim, "dkv"))
    return dq, dk, dv, dkp.to(q.dtype), dvp.to(q.dtype)


def _head_params(w, ln_w, ln_b, proj, proj_b, dev):
    lw = torch.ones(w, device=dev) if ln_w is None else ln_w.float().contiguous()
    lb = torch.zeros(w, device=dev) if ln_b is None else ln_b.float().contiguous()
    p = torch.eye(w, device=dev) if proj is None else proj.float().contiguous()
    e = p.shape[1]
    pb = torch.zeros(e, device=dev) if proj_b is None else proj_b.float().contiguous()
    return lw, lb, p, pb


def head_fwd(x, rows, ln_w, ln_b, eps, proj, proj_b, normalize):
    _check_dtype("x", x)
    x = x.contiguous()
    n, w = rows.numel(), x.shape[1]
    lw, lb, p, pb = _head_params(w, ln_w, ln_b, proj, proj_b, x.device)
    e = p.shape[1]
    out = torch.empty(n, e, dtype=x.dtype, device=x.device)
    y = torch.empty(n, w, dtype=torch.float32, device=x.device)
    z = torch.empty(n, e, dtype=torch.float32, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _head_fwd_kernel[(triton.cdiv(n, HEAD_BLOCK_N),)](
        x, rows.long().contiguous(), lw, lb, p, pb, out, y, z, mean, rstd, n, w, e, float(eps), int(bool(normalize)),
        BLOCK_N=HEAD_BLOCK_N, BLOCK_K=HEAD_BLOCK_K, BLOCK_E=HEAD_BLOCK_E, PREC=_prec(torch.float32),
        num_warps=HEAD_FWD_WARPS, num_stages=HEAD_FWD_STAGES)
    return out, y, z, mean, rstd


def head_bwd(grad_out, x, rows, ln_w, eps, proj, y, z, mean, rstd, normalize):
    x = x.contiguous()
    n, w = rows.numel(), x.shape[1]
    e = z.shape[1]
    go = grad_out.contiguous()
    gz = torch.empty(n, e, dtype=torch.float32, device=x.device)
    _head_bwd_gz_kernel[(triton.cdiv(n, HEAD_BLOCK_N),)](go, z, gz, n, e, int(bool(normalize)),
                                                         BLOCK_N=HEAD_BLOCK_N, BLOCK_E=HEAD_BLOCK_E)
    if proj is None:
        gy, dproj = gz, torch.empty(0, device=x.device)
    else:
        p = proj.float()
        gy, dproj = gz @ p.t(), y.t() @ gz
    gy = gy.contiguous()
    rows = rows.long().contiguous()
    lw = torch.ones(w, device=x.device) if ln_w is None else ln_w.float().contiguous()
    dx = torch.zeros_like(x)
    _head_bwd_ln_kernel[(triton.cdiv(n, HEAD_BLOCK_N),)](gy, x, rows, lw, mean, rstd, dx, n, w,
                                                         BLOCK_N=HEAD_BLOCK_N, BLOCK_K=HEAD_BLOCK_K)
    xhat = (x.index_select(0, rows).float() - mean[:, None]) * rstd[:, None]
    return dx, (gy * xhat).sum(0), gy.sum(0), dproj, gz.sum(0)


