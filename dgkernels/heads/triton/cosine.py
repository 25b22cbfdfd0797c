"""cosine_cross_entropy with shared class embeddings c [K, E] (and the per-sample dispatch).

Fused Cut-Cross-Entropy style for E <= 512: three kernels stream the classes (forward: online
log-sum-exp; backward: dxn per row block, dcn per class block, logits recomputed), so no logit
tile reaches memory. Wider features: row tiles of logits (matmul.mm) and the fused row kernel.

Derivation. With xn = x / |x|, cn = c / |c| (norms clamped at 1e-12 as F.normalize), logits
z_bk = s (x_b . c_k) rx_b rc_k, rx = 1 / |x|, rc = 1 / |c|. The GEMM runs on the raw inputs,
which are exact in their dtype, and the norms are applied in float32: rounding xn and cn to
bf16/fp16 first would put a relative error of one half-precision ulp into every logit.
Per row, q_bk = softmax_k - ls/K - (1 - ls) [k = t_b] (0 for an ignored row), dz = g_b q_bk:
  dL/dxn_b = s sum_k dz_bk cn_k = s g_b rcmax sum_k q_bk (rc_k / rcmax) c_k
  dL/dcn_k = s sum_b dz_bk xn_b = s wmax sum_b (g_b rx_b / wmax) q_bk x_b
where rcmax = max rc, wmax = max |g rx|: the half-precision GEMM operands stay in [-1, 1], whatever
the magnitude of g (1e-8 for a mean over a large batch: no fp16 subnormals).
dL/ds = sum_b sum_k dz_bk z_bk / s. The normalisations' backward runs in float32 on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_signature import CompileSpec
from ..._triton_signature import param_names, signature
from ._common import check_fp64, interpreting, launch_prec, op_dtype, tile_rows
from .cosine_per_sample import cos_per_sample
from .cross_entropy_rows import ce_rows
from .matmul import mm

CCE_MAX_E = 512  # the fused kernels hold a row block's E features in registers (CLIP ViT-B: 512)
CCE_E_BLOCKS = (64, 512)  # BLOCK_E of the compile specs: small heads, and every E in (256, 512]


def cce_config(dtype, E):
    """Launch configuration of the three fused kernels for features of size E: {kernel: (meta,
    num_warps, num_stages)}. Half precision: 64 x 64 tiles (wgmma on sm_90 wants M >= 64 and a
    multiple of 4 warps), 8 warps from E = 256 on and gradient accumulators of at most 256
    features per program, so that nothing spills (ptxas -v, sm_90a: see
    benchmarks/results/triton_sm90_resources.md); float32 (FMA or TF32): 16 x 32 tiles."""
    be = max(16, triton.next_power_of_2(E))
    warps = 8 if be >= 256 or dtype == torch.float32 else 4  # float32 FMA dots: 4 warps spilled at E = 64
    stages = 2 if be >= 256 else 3  # x and two stages of c within 227 KB of shared memory
    bm, bk = (16, 32) if dtype == torch.float32 else (64, 64)
    eo = min(be, 256)
    meta = dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_E=be)
    # dx and dc hold the most live tiles (logits, q, accumulator): 8 warps (4 spilled even at E = 64),
    # logits as a GEMM over 64-feature chunks (operand tiles held whole spilled at E = 512)
    grad = dict(meta, BLOCK_EO=eo, BLOCK_EC=min(be, 64))
    # dx: 128 output features per program (a [64, 256] accumulator spilled 228 bytes at E = 512 under
    # Triton 3.6, the GPU machine's), which also doubles its programs (128 -> 256 at B = 4096)
    dx = dict(grad, BLOCK_EO=min(eo, 128))
    return {"lse": (meta, warps, stages), "dx": (dx, 8, stages), "dc": (grad, 8, stages)}


@triton.jit
def _cos_dot(x, c, FP32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # x [M, E] @ c[N, E]^T -> [M, N] float32
    if UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
    elif FP32:
        return tl.dot(x, tl.trans(c), input_precision=PREC)
    else:
        return tl.dot(x, tl.trans(c))


@triton.jit
def _cos_lse_kernel(x_ptr, c_ptr, rx_ptr, rc_ptr, tgt_ptr, scale_ptr, lse_ptr, per_ptr, B, K, E, ls,
                    FP32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Forward: a BLOCK_M row block streams the classes BLOCK_K at a time (tl.dot logits, online
    log-sum-exp); no logits leave the chip."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    re = tl.arange(0, BLOCK_E)
    rk0 = tl.arange(0, BLOCK_K)
    mmask = rm < B
    x = tl.load(x_ptr + rm[:, None] * E + re[None, :], mask=mmask[:, None] & (re[None, :] < E), other=0.0)
    t = tl.load(tgt_ptr + rm, mask=mmask, other=-1)
    xs = tl.load(scale_ptr) * tl.load(rx_ptr + rm, mask=mmask, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + rk0).to(tl.int64)
        kmask = rk < K
        c = tl.load(c_ptr + rk[:, None] * E + re[None, :], mask=kmask[:, None] & (re[None, :] < E), other=0.0)
        rc = tl.load(rc_ptr + rk, mask=kmask, other=0.0)
        z = _cos_dot(x, c, FP32, PREC, UPCAST) * xs[:, None] * rc[None, :]
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
def _cos_raw(x_ptr, c_ptr, rm, rk, mmask, kmask, E, FP32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_EC: tl.constexpr):
    """x[rm] . c[rk] [BLOCK_M, BLOCK_K] for both gradient kernels, as a GEMM over BLOCK_EC feature
    chunks (x re-read from cache rather than held in registers beside the caller's accumulator).
    Statement order matters to ptxas here: the callers load their per-row scalars after this loop
    and form the scaled q before loading the operand tile; either the other way round spilled the
    half-precision E = 512 kernels (8-68 bytes, ptxas -v, sm_90a)."""
    rec = tl.arange(0, BLOCK_EC)
    dotxc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_EC):
        re = e0 + rec
        emask = re < E
        xe = tl.load(x_ptr + rm[:, None] * E + re[None, :], mask=mmask[:, None] & emask[None, :], other=0.0)
        ce = tl.load(c_ptr + rk[:, None] * E + re[None, :], mask=kmask[:, None] & emask[None, :], other=0.0)
        dotxc += _cos_dot(xe, ce, FP32, PREC, UPCAST)
    return dotxc


@triton.jit
def _cos_zq(dotxc, xs, rc, rk, t, lse, K, ls, kmask):
    """Logits z = s rx rc (x . c) and q = dz / g (module docstring; 0 on padding, ignored rows)."""
    z = dotxc * xs[:, None] * rc[None, :]
    q = tl.exp(z - lse[:, None]) - ls / K - tl.where(rk[None, :] == t[:, None], 1.0 - ls, 0.0)
    q = tl.where(kmask[None, :] & (t[:, None] >= 0), q, 0.0)
    return z, q


@triton.jit
def _grad_dot(a, b, acc, FP32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b for a float32 gradient tile a (entries in [-1, 1]) and an input-dtype tile b:
    half precision casts a to b's dtype (tensor cores), float32 follows PREC."""
    if UPCAST:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _cos_dx_kernel(x_ptr, c_ptr, rx_ptr, rc_ptr, rcmax_ptr, tgt_ptr, scale_ptr, lse_ptr, g_ptr, dx_ptr, dot_ptr,
                   B, K, E, ls, FP32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EO: tl.constexpr,
                   BLOCK_EC: tl.constexpr):
    """dL/dxn for a row block and BLOCK_EO of its features (program axis 1), and sum_k dz z per
    row (written by the first feature block); the logits of each class chunk from _cos_raw."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ro = tl.program_id(1) * BLOCK_EO + tl.arange(0, BLOCK_EO)
    rk0 = tl.arange(0, BLOCK_K)
    mmask = rm < B
    omask = ro < E
    t = tl.load(tgt_ptr + rm, mask=mmask, other=-1)
    lse = tl.load(lse_ptr + rm, mask=mmask, other=0.0)
    g = tl.load(g_ptr + rm, mask=mmask, other=0.0)
    sc = tl.load(scale_ptr)
    xs = sc * tl.load(rx_ptr + rm, mask=mmask, other=0.0)
    rcinv = 1.0 / tl.load(rcmax_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_EO), dtype=tl.float32)
    d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + rk0).to(tl.int64)
        kmask = rk < K
        dotxc = _cos_raw(x_ptr, c_ptr, rm, rk, mmask, kmask, E, FP32, PREC, UPCAST, BLOCK_M, BLOCK_K, BLOCK_EC)
        rc = tl.load(rc_ptr + rk, mask=kmask, other=0.0)
        z, q = _cos_zq(dotxc, xs, rc, rk, t, lse, K, ls, kmask)
        d += tl.sum(q * z, 1)
        a = q * (rc * rcinv)[None, :]
        co = tl.load(c_ptr + rk[:, None] * E + ro[None, :], mask=kmask[:, None] & omask[None, :], other=0.0)
        acc = _grad_dot(a, co, acc, FP32, PREC, UPCAST)
    out = acc * (g * sc / rcinv)[:, None]
    tl.store(dx_ptr + rm[:, None] * E + ro[None, :], out, mask=mmask[:, None] & omask[None, :])
    tl.store(dot_ptr + rm, d * g, mask=mmask & (tl.program_id(1) == 0))


@triton.jit
def _cos_dc_kernel(x_ptr, c_ptr, rx_ptr, rc_ptr, w_ptr, wmax_ptr, tgt_ptr, scale_ptr, lse_ptr, dc_ptr, B, K, E, ls,
                   ROWS_PER_SPLIT, FP32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EO: tl.constexpr,
                   BLOCK_EC: tl.constexpr):
    """dL/dcn for a class block and BLOCK_EO of its features (program axis 1), streaming the rows
    [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT) of row split s (program axis 2) BLOCK_M at a
    time into dc_ptr[s] (the launcher sums the splits); w = g rx per row; the logits of each row
    chunk from _cos_raw. Why the row split: K = 345 classes are 6 class blocks x 2 feature blocks,
    12 programs for 132 SMs, each streaming all B rows; split into ~22 row ranges they are 264."""
    row0 = tl.program_id(2) * ROWS_PER_SPLIT
    row1 = tl.minimum(B, row0 + ROWS_PER_SPLIT)
    dc_ptr += tl.program_id(2).to(tl.int64) * K * E
    rk = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    ro = tl.program_id(1) * BLOCK_EO + tl.arange(0, BLOCK_EO)
    rm0 = tl.arange(0, BLOCK_M)
    kmask = rk < K
    omask = ro < E
    rc = tl.load(rc_ptr + rk, mask=kmask, other=0.0)
    sc = tl.load(scale_ptr)
    wmax = tl.load(wmax_ptr)
    winv = 1.0 / wmax
    acc = tl.zeros((BLOCK_K, BLOCK_EO), dtype=tl.float32)
    for m0 in range(row0, row1, BLOCK_M):
        rm = (m0 + rm0).to(tl.int64)
        mmask = rm < row1
        dotxc = _cos_raw(x_ptr, c_ptr, rm, rk, mmask, kmask, E, FP32, PREC, UPCAST, BLOCK_M, BLOCK_K, BLOCK_EC)
        t = tl.load(tgt_ptr + rm, mask=mmask, other=-1)
        lse = tl.load(lse_ptr + rm, mask=mmask, other=0.0)
        xs = sc * tl.load(rx_ptr + rm, mask=mmask, other=0.0)
        w = tl.load(w_ptr + rm, mask=mmask, other=0.0)
        _, q = _cos_zq(dotxc, xs, rc, rk, t, lse, K, ls, kmask)
        a = q * (w * winv)[:, None]
        xo = tl.load(x_ptr + rm[:, None] * E + ro[None, :], mask=mmask[:, None] & omask[None, :], other=0.0)
        acc = _grad_dot(tl.trans(a), xo, acc, FP32, PREC, UPCAST)
    tl.store(dc_ptr + rk[:, None] * E + ro[None, :], acc * (sc * wmax), mask=kmask[:, None] & omask[None, :])


# ---- host ----------------------------------------------------------------------------------------------

def _inv_norm(t, normalize):
    """1 / max(||row||, 1e-12) in float32 (ones without normalisation), and the divisor."""
    if not normalize:
        return torch.ones(t.shape[:-1], dtype=torch.float32, device=t.device), None
    den = t.float().norm(dim=-1).clamp_min(1e-12)
    return (1.0 / den).contiguous(), den


def _normalize_backward(gy, y, den):
    active = (den > 1e-12).float()
    return (gy - y * (y * gy).sum(-1, keepdim=True) * active) / den


def _positive_max(t):
    m = t.abs().amax().reshape(1)
    return torch.where(m > 0, m, torch.ones_like(m))


def _flags(dt):
    return dict(FP32=dt == torch.float32, PREC=launch_prec(dt), UPCAST=dt == torch.bfloat16 and interpreting())


def _cce(xo, co, rx, rc, tgt, s, g, ls, per, dxn, dot):
    """Fused shared-class cosine CE (forward; with g also dxn, dot and the returned dcn)."""
    B, E = xo.shape
    K = co.shape[0]
    cfg = cce_config(xo.dtype, E)
    flags = _flags(xo.dtype)
    lse = torch.empty(B, dtype=torch.float32, device=xo.device)
    meta, warps, stages = cfg["lse"]
    _cos_lse_kernel[(triton.cdiv(B, meta["BLOCK_M"]),)](xo, co, rx, rc, tgt, s, lse, per, B, K, E, float(ls), **flags,
                                                       **meta, num_warps=warps, num_stages=stages)
    if g is None:
        return None
    rcmax = _positive_max(rc)
    meta, warps, stages = cfg["dx"]
    grid = (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(E, meta["BLOCK_EO"]))
    _cos_dx_kernel[grid](xo, co, rx, rc, rcmax, tgt, s, lse, g, dxn, dot, B, K, E, float(ls), **flags, **meta,
                         num_warps=warps, num_stages=stages)
    w = (g * rx).contiguous()
    meta, warps, stages = cfg["dc"]
    blocks = triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(E, meta["BLOCK_EO"])
    splits, rows = row_split(B, K, E, blocks, meta["BLOCK_M"], xo.device)
    dcn = torch.empty(splits, K, E, dtype=torch.float32, device=xo.device)
    grid = (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(E, meta["BLOCK_EO"]), splits)
    _cos_dc_kernel[grid](xo, co, rx, rc, w, _positive_max(w), tgt, s, lse, dcn, B, K, E, float(ls), rows, **flags,
                         **meta, num_warps=warps, num_stages=stages)
    return dcn[0] if splits == 1 else dcn.sum(0)  # a fixed-order sum: the same bits on every run


_TARGET_PROGRAMS = 2 * 132  # two waves on an H100/H200 (132 SMs)
_SPLIT_BYTES = 64 << 20  # the partial class gradients [splits, K, E] stay below this
_MIN_SPLIT_BLOCKS = 2  # row blocks per split: each program amortises its class tile over a few


def row_split(B, K, E, blocks, block_m, device=None) -> tuple[int, int]:
    """(row splits, rows per split) of the class-gradient kernel: enough programs for about two
    waves, at least _MIN_SPLIT_BLOCKS row blocks each, the partial gradients within _SPLIT_BYTES."""
    sms = _TARGET_PROGRAMS
    if device is not None and device.type == "cuda" and not interpreting():
        sms = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(sms, max(blocks, 1))
    most = min(max(1, B // (_MIN_SPLIT_BLOCKS * block_m)), max(1, _SPLIT_BYTES // max(4 * K * E, 1)))
    splits = max(1, min(want, most))
    rows = triton.cdiv(triton.cdiv(max(B, 1), splits), block_m) * block_m
    return triton.cdiv(max(B, 1), rows), rows


def _cos_tiles(xo, co, rx, rc, tgt, s, g, ls, per, dxn, dot):
    """Row-tile path for wide features: [R, K] logit tiles (raw GEMM, norms applied in float32),
    the fused row kernel, gradient GEMMs from the tile (mm casts float32 tiles row-scaled)."""
    B, E = xo.shape
    K = co.shape[0]
    grad = g is not None
    dcn = torch.zeros(K, E, dtype=torch.float32, device=xo.device) if grad else None
    R = tile_rows(K, B)
    for r0 in range(0, B, R):
        n = min(R, B - r0)
        xb = xo[r0:r0 + n]
        z = mm(xb, co.t())
        z.mul_((s * rx[r0:r0 + n])[:, None] * rc[None, :])
        ce_rows(z, tgt[r0:r0 + n], g[r0:r0 + n] if grad else None, ls, per[r0:r0 + n],
                dot[r0:r0 + n] if grad else None)
        if grad:
            mm(z * rc[None, :], co, out=dxn[r0:r0 + n])
            mm((z * rx[r0:r0 + n, None]).t(), xb, out=dcn, accumulate=True)
    if grad:
        dxn.mul_(s)
        dcn.mul_(s)
    return dcn


def _cosce(g, x, c, scale, target, normalize, ls, ignore_index):
    check_fp64(x)
    B, E = x.shape
    dev = x.device
    grad = g is not None
    s = scale.float().reshape(1)
    tgt = torch.where(target == ignore_index, torch.full_like(target, -1), target).long().contiguous()
    gf = g.float().contiguous() if grad else None
    per = torch.empty(B, dtype=torch.float32, device=dev)
    dot = torch.empty(B, dtype=torch.float32, device=dev) if grad else None
    rx, xden = _inv_norm(x, normalize)
    xn = x.float() * rx[:, None]
    dxn = torch.empty(B, E, dtype=torch.float32, device=dev) if grad else None
    if c.dim() == 3:
        cc = c.contiguous()
        gc = torch.empty_like(cc) if grad else None
        cos_per_sample(xn.contiguous(), cc, tgt, s, gf, ls, per, dot, dxn, gc, normalize)
    else:
        K = c.shape[0]
        opd = op_dtype(x)
        rc, cden = _inv_norm(c, normalize)
        if opd == torch.float32:  # no rounding to avoid: normalise first, as the reference does
            xo, co, rxk, rck = xn.contiguous(), (c.float() * rc[:, None]).contiguous(), torch.ones_like(rx), \
                torch.ones_like(rc)
        else:
            xo, co, rxk, rck = x.to(opd).contiguous(), c.to(opd).contiguous(), rx, rc
        if E <= CCE_MAX_E:
            dcn = _cce(xo, co, rxk, rck, tgt, s, gf, ls, per, dxn, dot) if B else torch.zeros(K, E, device=dev)
        else:
            dcn = _cos_tiles(xo, co, rxk, rck, tgt, s, gf, ls, per, dxn, dot)
        if grad:
            gc = _normalize_backward(dcn, c.float() * rc[:, None], cden[:, None]) if normalize else dcn
            gc = gc.to(c.dtype)
    if not grad:
        return per
    gs = (dot.sum() / s[0]).to(scale.dtype).reshape(scale.shape)
    gx = _normalize_backward(dxn, xn, xden[:, None]) if normalize else dxn
    return gx.to(x.dtype), gc, gs, per


def cosce_forward(x, c, scale, target, normalize, ls, ignore_index):
    return _cosce(None, x, c, scale, target, normalize, ls, ignore_index)


def cosce_backward(g, x, c, scale, target, normalize, ls, ignore_index):
    return _cosce(g, x, c, scale, target, normalize, ls, ignore_index)


def _specs():
    specs = []
    f32 = {n: "*fp32" for n in ("rx_ptr", "rc_ptr", "rcmax_ptr", "w_ptr", "wmax_ptr", "scale_ptr", "lse_ptr",
                                "per_ptr", "g_ptr", "dx_ptr", "dot_ptr", "dc_ptr")}
    kernels = {"lse": _cos_lse_kernel, "dx": _cos_dx_kernel, "dc": _cos_dc_kernel}
    for p, dt in (("*fp32", torch.float32), ("*bf16", torch.bfloat16), ("*fp16", torch.float16)):
        for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
            for E in CCE_E_BLOCKS:
                tag = f"{p},{prec},E{E}" if dt == torch.float32 else f"{p},E{E}"
                for which, (meta, warps, stages) in cce_config(dt, E).items():
                    kern = kernels[which]
                    names = param_names(kern)
                    sig = signature(kern, x_ptr=p, c_ptr=p, tgt_ptr="*i64", ls="fp32",
                                    **{n: t for n, t in f32.items() if n in names})
                    cx = dict(FP32=dt == torch.float32, PREC=prec, UPCAST=False, **meta)
                    specs.append(CompileSpec(f"{kern.fn.__name__}[{tag}]", kern, sig, cx, num_warps=warps,
                                             num_stages=stages))
    return specs


SPECS = _specs()
