"""mapper_project: f' = [f -] (f W^T + b) [normalised], shared or per-domain map."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_signature import CompileSpec
from ..._triton_signature import signature
from ._common import check_fp64, groups, op_dtype, row_block
from .matmul import mm


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


def _mapper_linear(xo, wo, bf, domain):
    if wo.dim() == 2:
        return mm(xo, wo.t(), bias=bf)
    D, E, _ = wo.shape
    order, off = groups(domain, D)
    xs = xo.index_select(0, order)
    ys = torch.empty(xo.shape[0], E, dtype=torch.float32, device=xo.device)
    for d in range(D):
        if off[d + 1] > off[d]:
            mm(xs[off[d]:off[d + 1]], wo[d].t(), out=ys[off[d]:off[d + 1]], bias=None if bf is None else bf[d])
    return torch.empty_like(ys).index_copy_(0, order, ys)


def mapper_forward(x, w, b, domain, residual, normalize):
    check_fp64(x)
    opd = op_dtype(x)
    y = _mapper_linear(x.to(opd), w.to(opd), None if b is None else b.float().contiguous(), domain).contiguous()
    B, E = y.shape
    norm = torch.empty(B if normalize else 0, dtype=torch.float32, device=x.device)
    if B:
        _mapper_rows_kernel[(B,)](x.contiguous(), y, norm if normalize else y, E, RESIDUAL=residual,
                                  NORMALIZE=normalize, BLOCK_E=row_block(E), num_warps=4)
    return y.to(x.dtype), norm


def mapper_backward(g, x, w, domain, out, norm, residual, normalize):
    B, E = g.shape
    gf = g.float().contiguous()
    if normalize:
        gr = torch.empty_like(gf)
        if B:
            _normalize_grad_kernel[(B,)](gf, out.contiguous(), norm, gr, E, BLOCK_E=row_block(E), num_warps=4)
    else:
        gr = gf
    gy = -gr if residual else gr
    opd = op_dtype(x)
    xo, wo = x.to(opd), w.to(opd)
    gyo = gy  # float32: mm casts it row-scaled against the half-precision weights
    if wo.dim() == 2:
        gx = mm(gyo, wo)
        gw = mm(gyo.t(), xo)
        gb = gy.sum(0)
    else:
        D, _, F = wo.shape
        order, off = groups(domain, D)
        xs, gys = xo.index_select(0, order), gyo.index_select(0, order)
        gxs = torch.empty(B, F, dtype=torch.float32, device=x.device)
        gw = torch.zeros(wo.shape, dtype=torch.float32, device=x.device)
        gb = torch.zeros(D, E, dtype=torch.float32, device=x.device)
        gy_s = gy.index_select(0, order)
        for d in range(D):
            lo, hi = off[d], off[d + 1]
            if hi > lo:
                mm(gys[lo:hi], wo[d], out=gxs[lo:hi])
                mm(gys[lo:hi].t(), xs[lo:hi], out=gw[d])
                gb[d] = gy_s[lo:hi].sum(0)
        gx = torch.empty_like(gxs).index_copy_(0, order, gxs)
    if residual:
        gx = gx + gr
    return gx.to(x.dtype), gw.to(w.dtype), gb.to(w.dtype)


def _specs():
    specs = []
    for p in ("*fp32", "*bf16", "*fp16"):
        for residual in (False, True):
            for normalize in (False, True):
                specs.append(CompileSpec(f"_mapper_rows_kernel[{p},res={residual},norm={normalize}]",
                                         _mapper_rows_kernel,
                                         signature(_mapper_rows_kernel, x_ptr=p, y_ptr="*fp32", norm_ptr="*fp32"),
                                         dict(RESIDUAL=residual, NORMALIZE=normalize, BLOCK_E=512), num_warps=4))
        specs.append(CompileSpec(f"_normalize_grad_kernel[{p}]", _normalize_grad_kernel,
                                 signature(_normalize_grad_kernel, g_ptr="*fp32", out_ptr=p, norm_ptr="*fp32",
                                           res_ptr="*fp32"), dict(BLOCK_E=512), num_warps=4))
    return specs


SPECS = _specs()
