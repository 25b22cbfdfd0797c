"""Contrastive family: every backend against the reference, the reference against the public
peers (info-nce-pytorch, open_clip ClipLoss, a direct SupCon formula), gradients, gradcheck,
opcheck, errors, NaN propagation and the distributed clip_loss path."""
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import dgkernels
from dgkernels.testing import EPS, assert_close_to_fp64, rel_error

HAS_CPP = dgkernels.backends()["cpp"].available
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="dgkernels._C not built")
HAS_TRITON = dgkernels.backends()["triton"].available

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _noncontig(t):
    """Same values, non-contiguous storage (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _clone(t, dtype=None):
    """A copy with the same strides (clone() would make a non-dense view contiguous)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t)


# Each case builds (fn(backend, *tensors) -> loss, tensors); the last tensor is the scale/temperature.
def _case(op, n, d, dtype, noncontig, g, device="cpu", amplitude=1.0):
    def rnd(*shape):
        x = (torch.randn(*shape, generator=g) * amplitude).to(dtype).to(device)
        return _noncontig(x) if noncontig else x

    if op == "info_nce":
        t = torch.tensor(0.2)
        return (lambda b, q, p, t: dgkernels.info_nce(q, p, temperature=t, backend=b)), [rnd(n, d), rnd(n, d), t]
    if op == "info_nce_symmetric":
        t = torch.tensor(0.3)
        return (lambda b, q, p, t: dgkernels.info_nce(q, p, temperature=t, reduction="sum", symmetric=True,
                                                      backend=b)), [rnd(n, d), rnd(n, d), t]
    if op == "info_nce_unpaired":
        t = torch.tensor(0.1)
        return (lambda b, q, p, nk, t: dgkernels.info_nce(q, p, nk, temperature=t, reduction="none", backend=b)), \
            [rnd(n, d), rnd(n, d), rnd(n + 3, d), t]
    if op == "clip_loss":
        s = torch.tensor(14.0)
        return (lambda b, x, y, s: dgkernels.clip_loss(x, y, s, backend=b)), [rnd(n, d), rnd(n, d), s]
    if op == "clip_loss_raw":  # no normalisation: the kernels see the caller's strides
        s = torch.tensor(3.0)
        return (lambda b, x, y, s: dgkernels.clip_loss(x, y, s, normalize=False, backend=b)), [rnd(n, d), rnd(n, d), s]
    if op == "multiview":
        t = torch.tensor(0.2)
        labels = torch.randint(0, max(1, n // 3), (n,), generator=g).to(device)
        return (lambda b, v, t: dgkernels.multiview_info_nce(v, t, labels=labels, backend=b)), [rnd(n, 3, d), t]
    raise KeyError(op)


OPS = ["info_nce", "info_nce_symmetric", "info_nce_unpaired", "clip_loss", "clip_loss_raw", "multiview"]


def _run(fn, backend, tensors, dtype=None, upstream=1.0):
    """Loss and gradients of `upstream * loss.sum()` (all returned on the CPU)."""
    ins = []
    for i, t in enumerate(tensors):
        if dtype is not None and i < len(tensors) - 1:
            t = _clone(t.detach(), dtype)
        elif dtype is not None:
            t = t.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
        else:
            t = _clone(t.detach())
        ins.append(t.requires_grad_())
    out = fn(backend, *ins)
    if upstream != 1.0:
        out = upstream * out
    grads = torch.autograd.grad(out.sum(), ins)
    return out.detach().cpu(), [gr.cpu() for gr in grads]


def _compare(backend, op, n, d, dtype, noncontig=False, device="cpu"):
    g = torch.Generator().manual_seed(1000 * n + d)
    fn, tensors = _case(op, n, d, dtype, noncontig, g, device)
    out, grads = _run(fn, backend, tensors)
    assert out.dtype == dtype
    exp, exp_grads = _run(fn, "reference", tensors, torch.float64)
    base, base_grads = _run(fn, "reference", tensors)
    _check(out, exp, base, dtype, f"{op} {backend} loss")
    for i, (a, e, b) in enumerate(zip(grads, exp_grads, base_grads)):
        assert a.dtype == tensors[i].dtype
        _check(a, e, b, dtype, f"{op} {backend} grad[{i}]")


def _check(actual, expected, baseline, dtype, name):
    if expected.abs().max() <= 1e-12:
        # Identically zero (e.g. N = 1: the only logit is the positive): a relative error is
        # meaningless, so allow a few ulps of the largest logit (|scale| <= 14 here).
        assert actual.abs().max() <= 16 * EPS[dtype] * 14, f"{name}: {actual} should be 0"
        return
    assert_close_to_fp64(actual, expected, baseline, dtype=dtype, name=name)


# --------------------------------------------------------------------------------------------
# cpp backend vs reference
# --------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [1, 7, 129, 1000])
def test_cpp_matches_reference_fp32(op, n):
    _compare("cpp", op, n, 37, torch.float32, noncontig=(n == 129))


@needs_cpp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [7, 300])
def test_cpp_matches_reference_low_precision(op, dtype, n):
    _compare("cpp", op, n, 40, dtype, noncontig=(n == 7))


@needs_cpp
def test_cpp_tiles_cover_uneven_blocks():
    # N, M not multiples of the CPU tile (256 x 1024), several column blocks, the diagonal in each.
    _compare("cpp", "multiview", 1100, 19, torch.float32)
    _compare("cpp", "info_nce_unpaired", 1030, 19, torch.float32)


# --------------------------------------------------------------------------------------------
# triton backend (interpreter without a GPU: tiny sizes)
# --------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")


@needs_triton
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (7, torch.float32), (20, torch.bfloat16), (20, torch.float16)])
def test_triton_matches_reference(op, n, dtype, triton_device):
    _compare("triton", op, n, 24, dtype, noncontig=(n == 7), device=triton_device)


@needs_triton
@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("op,dtype", [("clip_loss", torch.float16), ("multiview", torch.bfloat16),
                                      ("info_nce_unpaired", torch.float32)])
def test_triton_dq_held_on_chip_and_per_tile_match_reference(op, dtype, d, triton_device):
    # D = 64 is the widest D whose dQ the backward holds in registers across its column loop; 72
    # (padded to 80) is the narrowest that adds dQ per tile with atomics: both sides of the bound.
    from dgkernels.contrastive import triton as tri
    prec = tri._prec(dtype)
    assert tri._dq_hold("bwd", dtype, prec, -(-d // 16) * 16)["DQ_HOLD"] == (64 if d == 64 else 0)
    _compare("triton", op, 19, d, dtype, noncontig=True, device=triton_device)


def test_triton_dq_hold_bounds_come_from_compiled_configs():
    pytest.importorskip("triton")
    from dgkernels.contrastive import triton as tri

    # every held-dQ config is one of the backward's configs, and every held width is compile-checked
    names = {spec.name for spec in tri.COMPILE_SPECS}
    for (dclass, prec, hold), configs in tri.HOLD_CONFIGS.items():
        assert set(configs) <= set(tri.CONFIGS[("bwd", dclass)])
        variants = ["bf16", "fp16"] if dclass == "half" else [f"fp32_{prec}"]
        for bm, bn, bd, w, st in configs:
            for t in variants:
                assert f"contrastive_lse_bwd_{t}_m{bm}_n{bn}_d{bd}_w{w}_s{st}_hold{hold}" in names
    assert tri._dq_hold("bwd", torch.bfloat16, "tf32", 16) == {"DQ_HOLD": 64}
    assert tri._dq_hold("bwd", torch.float32, "tf32", 80) == {"DQ_HOLD": 128}
    assert tri._dq_hold("bwd", torch.float32, "ieee", 80) == {"DQ_HOLD": 0}
    assert tri._dq_hold("bwd", torch.float16, "tf32", 512) == {"DQ_HOLD": 0}
    assert tri._dq_hold("fwd", torch.float16, "tf32", 16) == {}


@needs_triton
@pytest.mark.parametrize("d", [768, 1024, 1280])
@pytest.mark.parametrize("op,dtype", [("clip_loss", torch.bfloat16), ("multiview", torch.float16),
                                      ("info_nce_unpaired", torch.float32)])
def test_triton_large_feature_sizes(op, dtype, d, triton_device):
    # ViT-L / ViT-H / bigG embedding sizes stay on the Triton path (the kernels loop over D).
    _compare("triton", op, 9, d, dtype, device=triton_device)


@needs_triton
@pytest.mark.parametrize("strategy,rows,splits", [("fused", None, None), ("slab", None, None), ("slab", 32, 1),
                                                  ("slab", 32, 3)])
@pytest.mark.parametrize("op,dtype", [("clip_loss", torch.bfloat16), ("multiview", torch.float16),
                                      ("info_nce_unpaired", torch.float32), ("info_nce", torch.float16)])
def test_triton_backward_strategies_match_reference(op, dtype, strategy, rows, splits, monkeypatch, triton_device):
    # Both backwards at one size: the fused kernel (atomics) and the G slabs with dQ / dK GEMMs, the
    # latter also cut into several slabs of 32 rows (the last one short) and with dQ's reduction
    # split over programs (3 asked: 2 or 3 used, by BLOCK_K), as at large N.
    from dgkernels.contrastive import triton_slab

    monkeypatch.setenv(triton_slab.STRATEGY_ENV, strategy)
    if rows is not None:
        monkeypatch.setattr(triton_slab, "_slab_rows", lambda *args: rows)
        monkeypatch.setattr(triton_slab, "_splits", lambda *args: splits)
    _compare("triton", op, 75, 40, dtype, noncontig=True, device=triton_device)


def test_triton_backward_strategy_choice(monkeypatch):
    pytest.importorskip("triton")
    from dgkernels.contrastive import triton_slab

    monkeypatch.delenv(triton_slab.STRATEGY_ENV, raising=False)
    assert triton_slab.wanted(512, 0) and triton_slab.wanted(triton_slab.SLAB_MIN_D, 0)
    assert not triton_slab.wanted(triton_slab.SLAB_MIN_D - 16, 0)  # narrower: the fused kernel
    assert not triton_slab.wanted(512, 64)  # dQ held on chip by the fused kernel
    assert not triton_slab.wanted(512, 0, 2 ** 24)  # in-tile offsets of a slab row would pass int32
    monkeypatch.setenv(triton_slab.STRATEGY_ENV, "fused")
    assert not triton_slab.wanted(1024, 0)
    monkeypatch.setenv(triton_slab.STRATEGY_ENV, "slab")
    assert triton_slab.wanted(16, 64)
    monkeypatch.setenv(triton_slab.STRATEGY_ENV, "fast")
    with pytest.raises(ValueError, match="auto, fused or slab"):
        triton_slab.wanted(512, 0)


def test_triton_slab_workspace_is_bounded_by_the_gradients():
    # The slab (2 R M elements) never takes more than the fp32 dQ + dK buffers, unless that is less
    # than one block of rows; R is a whole number of blocks; never more rows than the problem has.
    pytest.importorskip("triton")
    from dgkernels.contrastive import triton_slab

    for n, m, d, elem in [(4096, 4096, 512, 2), (65536, 65536, 512, 2), (262144, 262144, 1024, 2),
                          (4096, 4096, 512, 4), (1000, 50000, 512, 2), (100, 100, 512, 2)]:
        rows = triton_slab._slab_rows(n, m, d, elem)
        assert rows % triton_slab._SLAB_ALIGN == 0 and rows <= max(triton_slab._SLAB_ALIGN, -(-n // 128) * 128)
        assert rows == triton_slab._SLAB_ALIGN or 2 * rows * m * elem <= (n + m) * d * 4
    assert triton_slab._slab_rows(65536, 65536, 512, 2) == 1024  # R = 2 D at N = M in half precision


# The small-gradient regime (DESIGN 5.4): d(1e-3 * loss) has the magnitudes of a batch far larger
# than N = 512 with a mean reduction; features of norm ~2^-5 keep the feature gradients inside
# fp16's normal range, so what is measured is the kernel, not the output's underflow. PyTorch's
# own fp16 path is poor here, so the fused kernels are held to the fp32-internal cpp backend:
# both get the same half inputs and run the same O(N D) PyTorch around the primitive, and the
# primitive's result is rounded to the input dtype by the same autograd code; what the triton
# backend adds is the rounding of the (power-of-two scaled) G to the input dtype before its
# fp32-accumulated dots, a relative u per entry, no larger than that final rounding. So its error
# is at most about twice the cpp backend's (plus one ulp of the dtype as a floor).
SMALL_GRAD_OPS = ["clip_loss", "info_nce", "info_nce_symmetric", "info_nce_unpaired", "info_nce_paired", "multiview"]


def _small_grad_case(op, n, d, dtype, g, device):
    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 2.0 ** -10).to(dtype).to(device)

    t = torch.tensor(0.1)
    if op == "clip_loss":
        return (lambda b, x, y, s: dgkernels.clip_loss(x, y, s, backend=b)), [rnd(n, d), rnd(n, d), torch.tensor(14.0)]
    if op == "info_nce":
        return (lambda b, q, p, t: dgkernels.info_nce(q, p, temperature=t, backend=b)), [rnd(n, d), rnd(n, d), t]
    if op == "info_nce_symmetric":
        return (lambda b, q, p, t: dgkernels.info_nce(q, p, temperature=t, symmetric=True, backend=b)), \
            [rnd(n, d), rnd(n, d), t]
    if op == "info_nce_unpaired":
        return (lambda b, q, p, nk, t: dgkernels.info_nce(q, p, nk, temperature=t, backend=b)), \
            [rnd(n, d), rnd(n, d), rnd(n + 3, d), t]
    if op == "info_nce_paired":
        return (lambda b, q, p, nk, t: dgkernels.info_nce(q, p, nk, temperature=t, negative_mode="paired",
                                                          backend=b)), [rnd(n, d), rnd(n, d), rnd(n, 5, d), t]
    if op == "multiview":
        return (lambda b, v, t: dgkernels.multiview_info_nce(v, t, backend=b)), [rnd(n // 2, 2, d), t]
    raise KeyError(op)


def _small_gradient_check(backend, op, dtype, device):
    fn, tensors = _small_grad_case(op, 512, 64, dtype, torch.Generator().manual_seed(5), device)
    cpu = [t.cpu() for t in tensors]
    out, grads = _run(fn, backend, tensors, upstream=1e-3)
    ref, ref_grads = _run(fn, "cpp", cpu, upstream=1e-3)
    exp, exp_grads = _run(fn, "reference", cpu, torch.float64, upstream=1e-3)
    names = ["loss"] + [f"grad[{i}]" for i in range(len(grads))]
    for name, a, b, e in zip(names, [out] + grads, [ref] + ref_grads, [exp] + exp_grads):
        assert_close_to_fp64(a, e, b, dtype=dtype, factor=2.0, ulps=1.0, name=f"{op} {backend} {dtype} {name}")


@needs_triton
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", SMALL_GRAD_OPS)
def test_triton_small_gradient_regime_matches_fp32_internal_backend(op, dtype, triton_device):
    _small_gradient_check("triton", op, dtype, triton_device)


@needs_triton
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["clip_loss", "info_nce_unpaired", "multiview"])
def test_triton_slab_backward_small_gradient_regime(op, dtype, monkeypatch, triton_device):
    # The slab backward stores G in the input dtype between its kernels: the same power-of-two
    # scalings as the fused kernel must keep it at the fp32-internal backend's accuracy here.
    from dgkernels.contrastive import triton_slab

    monkeypatch.setenv(triton_slab.STRATEGY_ENV, "slab")
    _small_gradient_check("triton", op, dtype, triton_device)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [-100, 100])
def test_triton_backward_is_exact_under_power_of_two_weight_scaling(dtype, k, triton_device):
    # G is scaled by powers of two before its cast to the input dtype, so multiplying the upstream
    # weights by 2^k multiplies dQ, dK and dscale by exactly 2^k, far outside fp16's range (2^-24 ..
    # 2^16) in both directions. A cast of the unscaled G would flush to zero or overflow.
    from dgkernels.contrastive import triton as tri

    g = torch.Generator().manual_seed(4)
    q = torch.randn(40, 32, generator=g).to(dtype).to(triton_device)
    kk = torch.randn(50, 32, generator=g).to(dtype).to(triton_device)
    w_r = torch.randn(40, generator=g).to(triton_device)
    w_c = torch.randn(50, generator=g).to(triton_device)
    s = torch.tensor(3.0, device=triton_device)  # the kernels read the scale from device memory
    lse_r, lse_c = tri.lse_forward(q, kk, s, False, True)
    base = tri.lse_backward(q, kk, s, False, lse_r, lse_c, w_r, w_c)
    scaled = tri.lse_backward(q, kk, s, False, lse_r, lse_c, w_r * 2.0 ** k, w_c * 2.0 ** k)
    for a, b in zip(scaled, base):
        torch.testing.assert_close(a, b * 2.0 ** k, rtol=0, atol=0)


def _huge_stride_rows(n, d, dtype, g):
    """[n, d] rows 2^23 elements apart, starting 2^31 elements into their storage.

    Row 256 sits at offset 2^31: an i32 offset wraps to -2^31, which still lands inside the
    storage, so a kernel with 32-bit offsets reads wrong (zero) values instead of crashing. The
    storage is 8 GiB of virtual memory; only the pages of the n rows are ever touched.
    """
    stride, start = 2 ** 23, 2 ** 31
    base = torch.empty(start + (n - 1) * stride + d, dtype=dtype)
    rows = base.as_strided((n, d), (stride, 1), storage_offset=start)
    rows.copy_(torch.randn(n, d, generator=g).to(dtype))
    return rows


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_row_offsets_past_2_31(backend):
    if backend == "triton" and not (HAS_TRITON and dgkernels._dispatch.triton_interpret()):
        pytest.skip("needs the Triton interpreter (CPU tensors)")
    if backend == "cpp" and not HAS_CPP:
        pytest.skip("dgkernels._C not built")
    g = torch.Generator().manual_seed(11)
    n, d = 257, 16
    x = _huge_stride_rows(n, d, torch.float16, g)
    y = torch.randn(n, d, generator=g).to(torch.float16)
    fn = lambda b, x, y, s: dgkernels.clip_loss(x, y, s, normalize=False, backend=b)  # noqa: E731
    ins = [x, y, torch.tensor(2.0)]
    got, grads = _run(fn, backend, ins)  # _run keeps x's strides
    want, want_grads = _run(fn, "reference", ins, torch.float64)
    base, base_grads = _run(fn, "reference", [x.contiguous(), y, ins[2]])
    for name, a, e, b in zip(["loss", "dx", "dy", "ds"], [got] + grads, [want] + want_grads, [base] + base_grads):
        assert_close_to_fp64(a, e, b, dtype=torch.float16, name=f"{backend} {name}")


def test_float32_matmul_precision_selects_the_dot():
    pytest.importorskip("triton")
    from dgkernels.contrastive import triton as tri

    old = torch.get_float32_matmul_precision()
    try:
        for mode, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(mode)
            assert tri._prec(torch.float32) == want, mode
    finally:
        torch.set_float32_matmul_precision(old)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_column_sums_that_underflow_are_recomputed(dtype, triton_device):
    # One long query row anti-aligned with every key sets each column's Cauchy-Schwarz bound
    # (scale * 40 * ||k_j||, about 400 nats) far above the column's largest logit (about 0): every
    # fixed-reference column sum underflows and the exact transposed re-run must supply lse_c.
    # Columns 0..2 get a second long query row aligned with them, so those sums do not underflow.
    g = torch.Generator().manual_seed(2)
    n, d = 70, 16
    e1 = torch.zeros(d)
    e1[0] = 1.0
    q = torch.randn(n, d, generator=g) * 0.05
    k = torch.randn(n, d, generator=g) * 0.05 - e1
    q[0] = 40 * e1
    k[:3] = e1
    q[1] = 40 * e1
    q, k = q.to(dtype).to(triton_device), k.to(dtype).to(triton_device)
    s = 10.0
    from dgkernels.contrastive import triton as tri

    # precondition: columns 3.. lie more than 80 + log2(n) below the fixed reference (their
    # sums underflow the 2^-80 floor), columns 0..2 reach it
    qd, kd = q.cpu().double(), k.cpu().double()
    cref2 = torch.floor(tri.LOG2E * s * qd.norm(dim=1).max() * kd.norm(dim=1)) - tri._COL_HEADROOM
    gap = tri.LOG2E * s * (qd @ kd.T).max(0).values - cref2
    assert (gap[3:] < -80 - math.log2(n)).all() and (gap[:3] > -1).all()
    lse_r, lse_c = tri.lse_forward(q, k, torch.tensor(s, device=q.device), False, True)
    want_r, want_c = dgkernels.contrastive.reference.contrastive_lse(q.cpu().double(), k.cpu().double(), s, False, True)
    tol = 8 * EPS[torch.float32] * 400  # fp32 rounding of logits up to ~400
    assert (lse_r.cpu().double() - want_r).abs().max() <= tol
    assert (lse_c.cpu().double() - want_c).abs().max() <= tol
    _compare("triton", "clip_loss_raw", 1, 1, dtype, device=triton_device)  # the op end to end still runs


def test_every_autotune_config_is_compile_checked():
    pytest.importorskip("triton")
    from dgkernels.contrastive import triton as tri

    names = {spec.name for spec in tri.COMPILE_SPECS}
    for (kernel, dclass), configs in tri.CONFIGS.items():
        variants = [("bf16", ""), ("fp16", "")] if dclass == "half" else [("fp32", "_ieee"), ("fp32", "_tf32")]
        for bm, bn, bd, w, st in configs:
            for t, prec in variants:
                assert f"contrastive_lse_{kernel}_{t}{prec}_m{bm}_n{bn}_d{bd}_w{w}_s{st}" in names


# --------------------------------------------------------------------------------------------
# GPU: triton and cuda backends against the reference (skipped without CUDA)
# --------------------------------------------------------------------------------------------

def _gpu_backend(backend):
    why = dgkernels.explain("clip_loss", "cuda")[backend]
    if why:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,d,dtype", [(1000, 512, torch.bfloat16), (1000, 512, torch.float16), (333, 768, torch.float32),
                                       (300, 1280, torch.bfloat16), (4097, 64, torch.float16), (1, 24, torch.float32)])
def test_gpu_matches_reference(backend, op, n, d, dtype):
    _gpu_backend(backend)
    _compare(backend, op, n, d, dtype, noncontig=(n == 333), device="cuda")


@pytest.mark.gpu
@needs_cpp
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", SMALL_GRAD_OPS)
def test_gpu_small_gradient_regime_matches_fp32_internal_backend(backend, op, dtype):
    _gpu_backend(backend)
    _small_gradient_check(backend, op, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "slab"])
@pytest.mark.parametrize("op,dtype", [("clip_loss", torch.bfloat16), ("multiview", torch.float16),
                                      ("info_nce_unpaired", torch.float32)])
def test_gpu_triton_backward_strategies_match_reference(op, dtype, strategy, monkeypatch):
    # CLIP width: auto picks the slabs here, so the fused kernel is forced for the other side.
    _gpu_backend("triton")
    from dgkernels.contrastive import triton_slab

    monkeypatch.setenv(triton_slab.STRATEGY_ENV, strategy)
    _compare("triton", op, 1500, 512, dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_triton_slab_backward_is_deterministic(monkeypatch):
    # No atomics in the slab backward: two runs agree bit for bit (the fused kernel's need not).
    _gpu_backend("triton")
    from dgkernels.contrastive import triton_slab

    monkeypatch.setenv(triton_slab.STRATEGY_ENV, "slab")
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(3000, 512, generator=g), dim=1).to("cuda", torch.bfloat16)
    y = F.normalize(torch.randn(3000, 512, generator=g), dim=1).to("cuda", torch.bfloat16)
    runs = [_run(lambda b, a, c, s: dgkernels.clip_loss(a, c, s, backend=b), "triton", [x, y, torch.tensor(14.0)])
            for _ in range(2)]
    for a, b in zip([runs[0][0]] + runs[0][1], [runs[1][0]] + runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["highest", "high"])
def test_gpu_triton_fp32_follows_matmul_precision(mode):
    _gpu_backend("triton")
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        # "high" (TF32) is held to PyTorch's own TF32 error, "highest" to its fp32 error.
        _compare("triton", "clip_loss", 2000, 512, torch.float32, device="cuda")
    finally:
        torch.set_float32_matmul_precision(old)


# --------------------------------------------------------------------------------------------
# reference vs public peers
# --------------------------------------------------------------------------------------------

BACKENDS_CPU = ["reference"] + (["cpp"] if HAS_CPP else [])


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("mode", [None, "unpaired", "paired"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_info_nce_matches_package(backend, mode, reduction):
    info_nce_pkg = pytest.importorskip("info_nce")
    n, m, d = 33, 17, 24
    q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    neg = None if mode is None else torch.randn(*((n, m, d) if mode == "paired" else (m, d)), requires_grad=True)
    kw = dict(temperature=0.07, reduction=reduction, negative_mode=mode or "unpaired")
    ins = [q, p] + ([neg] if neg is not None else [])
    want = info_nce_pkg.info_nce(q, p, neg, **kw)
    got = dgkernels.info_nce(q, p, neg, backend=backend, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gw = torch.autograd.grad(want.sum(), ins)
    gg = torch.autograd.grad(got.sum(), ins)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    module = dgkernels.InfoNCE(**kw, backend=backend)
    torch.testing.assert_close(module(q, p, neg), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_info_nce_symmetric_is_mean_of_both_directions(backend):
    q, p = torch.randn(9, 5), torch.randn(9, 5)
    got = dgkernels.info_nce(q, p, temperature=0.5, symmetric=True, reduction="none", backend=backend)
    want = 0.5 * (dgkernels.info_nce(q, p, temperature=0.5, reduction="none", backend="reference")
                  + dgkernels.info_nce(p, q, temperature=0.5, reduction="none", backend="reference"))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_clip_loss_matches_open_clip(backend, scale_kind):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    n, d = 40, 32
    x, y = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True) if scale_kind == "tensor" else 10.0
    ins = [x, y] + ([s] if scale_kind == "tensor" else [])
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    want = open_clip_loss.ClipLoss()(xn, yn, s)
    got = dgkernels.clip_loss(x, y, s, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, ins), torch.autograd.grad(want, ins)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # normalize=False is ClipLoss on the raw features
    raw = dgkernels.clip_loss(x * 0.3, y * 0.3, s, normalize=False, backend=backend)
    torch.testing.assert_close(raw, open_clip_loss.ClipLoss()(x * 0.3, y * 0.3, s), rtol=1e-5, atol=1e-5)


def _supcon(views, labels, t):
    """SupContrast (Khosla et al.) contrast_mode='all', base_temperature = temperature, written out."""
    n, v, _ = views.shape
    z = F.normalize(torch.cat(torch.unbind(views, dim=1)), dim=-1)
    lab = torch.arange(n) if labels is None else labels
    mask = (lab[:, None] == lab[None, :]).float().repeat(v, v)
    logits = z @ z.T / t
    not_self = 1 - torch.eye(n * v)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    npos = mask.sum(1)
    mean_pos = (mask * log_prob).sum(1) / torch.where(npos < 1e-6, torch.ones_like(npos), npos)
    return (-mean_pos).view(v, n).mean()


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("v,with_labels", [(2, False), (3, False), (2, True), (1, True)])
def test_multiview_matches_supcon(backend, v, with_labels):
    n, d = 12, 16
    views = torch.randn(n, v, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (n,)) if with_labels else None
    got = dgkernels.multiview_info_nce(views, 0.2, labels=labels, backend=backend)
    want = _supcon(views, labels, 0.2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, views)[0], torch.autograd.grad(want, views)[0])
    scaled = dgkernels.multiview_info_nce(views, 0.2, labels=labels, base_temperature=0.07, backend=backend)
    torch.testing.assert_close(scaled, want * (0.2 / 0.07))
    per = dgkernels.multiview_info_nce(views, 0.2, labels=labels, reduction="none", backend=backend)
    assert per.shape == (n, v)
    torch.testing.assert_close(per.mean(), got)


def test_multiview_v2_is_nt_xent():
    n, d, t = 10, 8, 0.5
    a, b = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = (z @ z.T / t).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    want = F.cross_entropy(logits, target)
    torch.testing.assert_close(dgkernels.multiview_info_nce(torch.stack([a, b], 1), t), want)


# --------------------------------------------------------------------------------------------
# float64 gradcheck (opcheck of the custom ops: tests/test_op_registry.py)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(backend, op):
    g = torch.Generator().manual_seed(3)
    fn, tensors = _case(op, 6, 5, torch.float64, False, g)
    ins = [t.to(torch.float64).requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: fn(backend, *a), ins)


@needs_cpp
def test_torch_compile_traces_cpp_ops():
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    compiled = torch.compile(lambda a, b: dgkernels.clip_loss(a, b, 5.0, backend="cpp"), backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x, y), dgkernels.clip_loss(x, y, 5.0, backend="reference"))


# --------------------------------------------------------------------------------------------
# errors and NaN policy
# --------------------------------------------------------------------------------------------

def _bad_calls():
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    return [
        ("query rank", lambda: dgkernels.info_nce(torch.randn(4), p), ValueError, "query"),
        ("positive rank", lambda: dgkernels.info_nce(q, torch.randn(4, 8, 1)), ValueError, "positive_key"),
        ("unpaired rank", lambda: dgkernels.info_nce(q, p, torch.randn(2, 3, 8)), ValueError, "negative_keys"),
        ("paired rank", lambda: dgkernels.info_nce(q, p, torch.randn(3, 8), negative_mode="paired"), ValueError, "negative_keys"),
        ("N mismatch", lambda: dgkernels.info_nce(q, torch.randn(5, 8)), ValueError, "same number of samples"),
        ("paired N", lambda: dgkernels.info_nce(q, p, torch.randn(3, 2, 8), negative_mode="paired"), ValueError, "same number of samples"),
        ("D mismatch", lambda: dgkernels.info_nce(q, torch.randn(4, 7)), ValueError, "components"),
        ("neg D mismatch", lambda: dgkernels.info_nce(q, p, torch.randn(3, 7)), ValueError, "components"),
        ("empty", lambda: dgkernels.info_nce(torch.randn(0, 8), torch.randn(0, 8)), ValueError, "empty"),
        ("int dtype", lambda: dgkernels.info_nce(q.long(), p.long()), TypeError, "floating"),
        ("mixed dtype", lambda: dgkernels.info_nce(q, p.double()), TypeError, "dtype"),
        ("devices", lambda: dgkernels.info_nce(q, p.to("meta")), ValueError, "device"),
        ("temperature 0", lambda: dgkernels.info_nce(q, p, temperature=0.0), ValueError, "temperature"),
        ("temperature <0 tensor", lambda: dgkernels.info_nce(q, p, temperature=torch.tensor(-1.0)), ValueError, "temperature"),
        ("reduction", lambda: dgkernels.info_nce(q, p, reduction="avg"), ValueError, "reduction"),
        ("mode", lambda: dgkernels.info_nce(q, p, negative_mode="both"), ValueError, "negative_mode"),
        ("symmetric with negatives", lambda: dgkernels.info_nce(q, p, torch.randn(3, 8), symmetric=True), ValueError, "symmetric"),
        ("clip rank", lambda: dgkernels.clip_loss(torch.randn(4, 8, 1), p, 1.0), ValueError, "image_features"),
        ("clip N", lambda: dgkernels.clip_loss(q, torch.randn(5, 8), 1.0), ValueError, "shape"),
        ("clip D", lambda: dgkernels.clip_loss(q, torch.randn(4, 7), 1.0), ValueError, "shape"),
        ("clip empty", lambda: dgkernels.clip_loss(torch.randn(0, 8), torch.randn(0, 8), 1.0), ValueError, "empty"),
        ("clip int", lambda: dgkernels.clip_loss(q.int(), p.int(), 1.0), TypeError, "floating"),
        ("clip devices", lambda: dgkernels.clip_loss(q, p.to("meta"), 1.0), ValueError, "device"),
        ("clip scale", lambda: dgkernels.clip_loss(q, p, -2.0), ValueError, "logit_scale"),
        ("clip scale shape", lambda: dgkernels.clip_loss(q, p, torch.ones(2)), ValueError, "logit_scale"),
        ("mv rank", lambda: dgkernels.multiview_info_nce(q), ValueError, "views"),
        ("mv empty", lambda: dgkernels.multiview_info_nce(torch.randn(0, 2, 8)), ValueError, "empty"),
        ("mv single view", lambda: dgkernels.multiview_info_nce(torch.randn(1, 1, 8)), ValueError, "N \\* V"),
        ("mv int", lambda: dgkernels.multiview_info_nce(torch.ones(3, 2, 4, dtype=torch.int64)), TypeError, "floating"),
        ("mv temperature", lambda: dgkernels.multiview_info_nce(torch.randn(3, 2, 4), 0), ValueError, "temperature"),
        ("mv reduction", lambda: dgkernels.multiview_info_nce(torch.randn(3, 2, 4), reduction="max"), ValueError, "reduction"),
        ("mv labels shape", lambda: dgkernels.multiview_info_nce(torch.randn(3, 2, 4), labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
        ("mv labels float", lambda: dgkernels.multiview_info_nce(torch.randn(3, 2, 4), labels=torch.zeros(3)), TypeError, "labels"),
        ("mv labels device", lambda: dgkernels.multiview_info_nce(torch.randn(3, 2, 4), labels=torch.zeros(3, dtype=torch.long, device="meta")), ValueError, "device"),
        ("backend", lambda: dgkernels.info_nce(q, p, backend="fortran"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_errors(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_unavailable_backend_names_reason():
    with pytest.raises(dgkernels.BackendUnavailableError, match="cuda"):
        dgkernels.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_nan_propagates(backend):
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    x[2, 1] = float("nan")
    assert torch.isnan(dgkernels.clip_loss(x, y, 2.0, backend=backend))
    assert torch.isnan(dgkernels.info_nce(x, y, backend=backend))
    assert torch.isnan(dgkernels.multiview_info_nce(torch.stack([x, y], 1), backend=backend))


@needs_triton
def test_triton_nan_propagates(triton_device):
    x, y = torch.randn(6, 4, device=triton_device), torch.randn(6, 4, device=triton_device)
    x[2, 1] = float("nan")
    assert torch.isnan(dgkernels.clip_loss(x, y, 2.0, backend="triton"))  # through the column sums too
    assert torch.isnan(dgkernels.info_nce(x, y, backend="triton"))
    assert torch.isnan(dgkernels.multiview_info_nce(torch.stack([x, y], 1), backend="triton"))


# --------------------------------------------------------------------------------------------
# distributed clip_loss: 2 gloo processes == one process over the global batch
# --------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, backend, x, y, s0, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = x.shape[0] // world
        xl = x[rank * n:(rank + 1) * n].clone().requires_grad_()
        yl = y[rank * n:(rank + 1) * n].clone().requires_grad_()
        s = torch.tensor(s0, requires_grad=True)
        loss = dgkernels.clip_loss(xl, yl, s, group=dist.group.WORLD, backend=backend)
        loss.backward()
        torch.save({"loss": loss.detach(), "gx": xl.grad, "gy": yl.grad, "gs": s.grad}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still talks to it (SIGABRT at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_clip_loss_distributed_matches_single_process(backend, tmp_path):
    import torch.multiprocessing as mp

    world, n, d, s0 = 2, 6, 8, 7.0
    x, y = torch.randn(world * n, d), torch.randn(world * n, d)
    mp.spawn(_dist_worker, args=(world, _free_port(), backend, x, y, s0, str(tmp_path)), nprocs=world, join=True)
    xs, ys, s = x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(s0, requires_grad=True)
    want = dgkernels.clip_loss(xs, ys, s, backend="reference")
    gx, gy, gs = torch.autograd.grad(want, [xs, ys, s])
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for p in parts:
        torch.testing.assert_close(p["loss"], want.detach())
    torch.testing.assert_close(torch.cat([p["gx"] for p in parts]), gx)
    torch.testing.assert_close(torch.cat([p["gy"] for p in parts]), gy)
    torch.testing.assert_close(sum(p["gs"] for p in parts), gs)
