"""Every public dgkernels op under torch.compile(fullgraph=True): forward and backward trace
without a graph break and match eager (values and gradients).

The default compiler backend here is "aot_eager" (dynamo + AOTAutograd: the whole trace, fake
kernels, custom-op autograd; no code generation, so the module stays fast); the ops marked
INDUCTOR also go through inductor's C++ code generation on CPU (Triton on CUDA).
DGKERNELS_TEST_COMPILE_BACKEND=inductor runs every op through inductor.
"""
import functools
import os

import pytest
import torch

import dgkernels

COMPILER = os.environ.get("DGKERNELS_TEST_COMPILE_BACKEND", "aot_eager")
INDUCTOR = {"clip_loss", "domain_cross_entropy"}


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def _idx(values, device="cpu"):
    return torch.tensor(values, device=device)


# op -> (function of the inputs returning a scalar, input builder)
CASES = {
    "clip_loss": (lambda x, y, s, **kw: dgkernels.clip_loss(x, y, s, **kw),
                  lambda d, dev: (_randn(9, 16, dtype=d, device=dev), _randn(9, 16, dtype=d, device=dev),
                                  torch.tensor(10.0, device=dev, requires_grad=True))),
    "info_nce": (lambda q, p, n, **kw: dgkernels.info_nce(q, p, n, temperature=0.2, **kw),
                 lambda d, dev: (_randn(7, 12, dtype=d, device=dev), _randn(7, 12, dtype=d, device=dev),
                                 _randn(5, 12, dtype=d, device=dev))),
    "info_nce_symmetric": (lambda q, p, **kw: dgkernels.info_nce(q, p, symmetric=True, reduction="sum", **kw),
                           lambda d, dev: (_randn(7, 12, dtype=d, device=dev), _randn(7, 12, dtype=d, device=dev))),
    "multiview_info_nce": (lambda v, labels, **kw: dgkernels.multiview_info_nce(v, 0.1, labels=labels, **kw),
                           lambda d, dev: (_randn(6, 3, 16, dtype=d, device=dev), _idx([3, 1, 3, 7, 1, 0], dev))),
    "domain_fanout": (lambda x, w, b, **kw: dgkernels.domain_fanout(x, w, b, **kw).square().sum(),
                      lambda d, dev: (_randn(5, 16, dtype=d, device=dev), _randn(3, 4, 16, dtype=d, device=dev),
                                      _randn(3, 4, dtype=d, device=dev))),
    "domain_cross_entropy": (lambda x, w, b, dom, t, **kw: dgkernels.domain_cross_entropy(x, w, b, dom, t, label_smoothing=0.1, **kw),
                             lambda d, dev: (_randn(5, 16, dtype=d, device=dev), _randn(3, 4, 16, dtype=d, device=dev),
                                             _randn(3, 4, dtype=d, device=dev), _idx([0, 1, 2, 1, 0], dev),
                                             _idx([3, 0, 1, 2, 3], dev))),
    "domain_cross_entropy_none": (
        lambda x, w, b, dom, t, **kw: (dgkernels.domain_cross_entropy(x, w, b, dom, t, reduction="none", **kw)
                                 * torch.arange(1, 6, device=x.device)).sum(),
        lambda d, dev: (_randn(5, 16, dtype=d, device=dev), _randn(3, 4, 16, dtype=d, device=dev), None,
                        _idx([0, 1, 2, 1, 0], dev), _idx([3, 0, 1, 2, 3], dev))),
    "head_agreement": (lambda x, w, b, **kw: dgkernels.head_agreement(x, w, b, kind="sym_kl", **kw),
                       lambda d, dev: (_randn(5, 16, dtype=d, device=dev), _randn(3, 4, 16, dtype=d, device=dev),
                                       _randn(3, 4, dtype=d, device=dev))),
    "mapper_project": (lambda x, w, dom, **kw: (dgkernels.mapper_project(x, w, domain=dom, **kw) * x.detach()).sum(),
                       lambda d, dev: (_randn(5, 16, dtype=d, device=dev), _randn(3, 16, 16, dtype=d, device=dev),
                                       _idx([0, 1, 2, 1, 0], dev))),
    "cosine_cross_entropy": (lambda x, c, s, t, **kw: dgkernels.cosine_cross_entropy(x, c, s, t, **kw),
                             lambda d, dev: (_randn(5, 16, dtype=d, device=dev), _randn(4, 16, dtype=d, device=dev),
                                             torch.tensor(20.0, device=dev, requires_grad=True),
                                             _idx([3, 0, 1, -100, 3], dev))),
}
_COMPILED = {}  # (case, compiler) -> compiled function, shared by every test of the module


def _compiled(case, compiler):
    key = (case, compiler)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(CASES[case][0], fullgraph=True, backend=compiler)
    return _COMPILED[key]


def _tol(dtype):
    # Same kernels in both modes; only the PyTorch around them may be fused (inductor): a few ulps.
    return 16 * torch.finfo(dtype).eps


def _run(fn, inputs):
    out = fn(*inputs)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out.detach(), torch.autograd.grad(out, wrt)


def _check(case, compiler, dtype, device="cpu", backend=None, tol=None):
    fn, build = CASES[case]
    inputs = build(dtype, device)
    if backend is None:
        compiled = _compiled(case, compiler)
    else:
        fn = functools.partial(fn, backend=backend)
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    want, want_g = _run(fn, inputs)
    got, got_g = _run(compiled, inputs)
    tol = _tol(dtype) if tol is None else tol
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().item()))
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))


def _compilers(case):
    return sorted({COMPILER, "inductor"}) if case in INDUCTOR else [COMPILER]


@pytest.mark.parametrize("case,compiler", [(c, b) for c in CASES for b in _compilers(c)])
def test_fullgraph_matches_eager(case, compiler):
    if not dgkernels.backends()["cpp"]:
        pytest.skip("needs the compiled cpp backend (the custom-op path); " + dgkernels.backends()["cpp"].reason)
    _check(case, compiler, torch.float32)


@pytest.mark.parametrize("case", ["clip_loss", "cosine_cross_entropy"])
def test_fullgraph_reference_backend(case):
    _check(case, "aot_eager", torch.float64, backend="reference")


@pytest.mark.parametrize("case", ["clip_loss", "domain_cross_entropy"])
def test_fullgraph_triton_backend(case, triton_device):
    if not dgkernels.backends()["triton"]:
        pytest.skip(dgkernels.backends()["triton"].reason)
    # aot_eager runs the traced PyTorch as eager does and the same kernels: equal to the bit.
    _check(case, "aot_eager", torch.float32, device=triton_device, backend="triton", tol=0.0)


def test_compiled_index_check_raises_at_run_time():
    """Out-of-range indices: ValueError in eager (unchanged); under compile a device-side assert."""
    x, w = torch.randn(4, 8), torch.randn(2, 3, 8)
    bad = torch.tensor([0, 1, 3, 0])  # class 3 of K = 3
    dom = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\)"):
        dgkernels.domain_cross_entropy(x, w, None, dom, bad)
    fn = torch.compile(lambda x, w, d, t, **kw: dgkernels.domain_cross_entropy(x, w, None, d, t, **kw), fullgraph=True,
                       backend="aot_eager")
    assert torch.isfinite(fn(x, w, dom, torch.tensor([0, 1, 2, 0])))
    with pytest.raises(RuntimeError, match=r"target values must lie in \[0, 3\)"):
        fn(x, w, dom, bad)


def test_compiled_scale_check_and_switch(monkeypatch):
    x, c, t = torch.randn(4, 8), torch.randn(3, 8), torch.tensor([0, 1, 2, 0])
    fn = torch.compile(lambda x, c, s, t, **kw: dgkernels.cosine_cross_entropy(x, c, s, t, **kw), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(RuntimeError, match="logit_scale must be finite and > 0"):
        fn(x, c, torch.tensor(-1.0), t)
    # DGKERNELS_COMPILED_CHECKS=0 (read at trace time) traces no assert at all.
    monkeypatch.setenv("DGKERNELS_COMPILED_CHECKS", "0")
    unchecked = torch.compile(lambda x, c, s, t, **kw: dgkernels.cosine_cross_entropy(x, c, s, t, **kw) * 1.0, fullgraph=True,
                              backend="aot_eager")
    unchecked(x, c, torch.tensor(-1.0), t)  # no error: the caller opted out
