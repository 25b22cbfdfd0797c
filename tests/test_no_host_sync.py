"""No host read of the logit scale / temperature per call.

A learnable logit scale lives on the GPU; reading it on the host (`float(t)`, `t.item()`) is a
device->host copy that waits for the stream, once per fused call. The fused backends take the
scale as a tensor and read it in device memory (Triton: a pointer; CUDA C++: a tensor operand of
the tile ops), and an eager value check of a scale on an accelerator is a device-side assert.

On a CPU-only machine the test makes every Python-level host read of a floating tensor raise
while an op runs forward and backward (eager and compiled), and has the eager checks treat the
scale as an accelerator tensor (`_validate.host_readable`): so the path a CUDA scale takes is
checked here. (The CPU C++ kernels read the CPU scalar in C++, no synchronisation there.) On a
CUDA machine the same ops also run under torch.cuda.set_sync_debug_mode("error"), which fails
on any synchronising CUDA call.
"""
import contextlib

import pytest
import torch

import dgkernels
from dgkernels import _validate

COMPILER = "aot_eager"


def _refusing(name, real):
    def method(self, *args, **kwargs):
        if self.is_floating_point():
            raise AssertionError(f"Tensor.{name}() on a floating tensor of shape {tuple(self.shape)} during the op: "
                                 "a host read (on CUDA, a sync per call)")
        return real(self, *args, **kwargs)

    return method


@contextlib.contextmanager
def _no_host_reads():
    """Every host read of a floating tensor raises; scale checks take the accelerator path."""
    saved = {n: getattr(torch.Tensor, n) for n in ("item", "__float__", "tolist")}
    readable = _validate.host_readable
    try:
        for n, real in saved.items():
            setattr(torch.Tensor, n, _refusing(n, real))
        _validate.host_readable = lambda t: False
        yield
    finally:
        for n, real in saved.items():
            setattr(torch.Tensor, n, real)
        _validate.host_readable = readable


def _rand(*shape, device, grad=True):
    return torch.randn(*shape, device=device).requires_grad_(grad)


def _scale(v, device):
    return torch.tensor(v, device=device, requires_grad=True)


# name -> (op taking (inputs..., backend=...), inputs builder); every case has a tensor scale
CASES = {
    "clip_loss": (lambda x, y, s, **kw: dgkernels.clip_loss(x, y, s, **kw),
                  lambda dev: (_rand(9, 16, device=dev), _rand(9, 16, device=dev), _scale(10.0, dev))),
    "info_nce": (lambda q, p, n, t, **kw: dgkernels.info_nce(q, p, n, temperature=t, **kw),
                 lambda dev: (_rand(7, 12, device=dev), _rand(7, 12, device=dev), _rand(5, 12, device=dev),
                              _scale(0.2, dev))),
    "info_nce_symmetric": (lambda q, p, t, **kw: dgkernels.info_nce(q, p, temperature=t, symmetric=True, **kw),
                           lambda dev: (_rand(7, 12, device=dev), _rand(7, 12, device=dev), _scale(0.2, dev))),
    "multiview_info_nce": (lambda v, t, **kw: dgkernels.multiview_info_nce(v, t, base_temperature=0.07, **kw),
                           lambda dev: (_rand(5, 2, 12, device=dev), _scale(0.1, dev))),
    "cosine_cross_entropy": (lambda x, c, s, t, **kw: dgkernels.cosine_cross_entropy(x, c, s, t, **kw),
                             lambda dev: (_rand(6, 12, device=dev), _rand(4, 12, device=dev), _scale(14.0, dev),
                                          torch.tensor([0, 1, 2, 3, 0, 1], device=dev))),
    # a Python-float scale becomes a device tensor without a host->device copy (torch.full)
    "clip_loss_float_scale": (lambda x, y, **kw: dgkernels.clip_loss(x, y, 10.0, **kw),
                              lambda dev: (_rand(9, 16, device=dev), _rand(9, 16, device=dev))),
}


def _fused_backends(device):
    names = ["cpp"] if device == "cpu" else ["cuda"]
    names.append("triton")
    return [b for b in names if dgkernels.backends()[b]]


def _forward_backward(fn, inputs):
    loss = fn(*inputs)
    loss.backward()
    return loss.detach(), [t.grad for t in inputs if t.requires_grad]


def _fresh(build, device):
    torch.manual_seed(0)
    return build(device)


def _check(case, backend, device, compiled, guard):
    op, build = CASES[case]
    fn = lambda *a: op(*a, backend=backend)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend=COMPILER)
    want = _forward_backward(fn, _fresh(build, device))  # warm-up: traces, autotunes, no guard
    with guard():
        got = _forward_backward(fn, _fresh(build, device))
    # Same inputs and kernels; fp32 atomics (Triton) and threads (cpp) may reorder sums: torch's
    # float32 tolerances.
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_scale_never_read_on_host(case, compiled, triton_device):
    device = torch.device(triton_device).type
    backends = _fused_backends(device)
    if not backends:
        pytest.skip("no fused backend available")
    for backend in backends:
        _check(case, backend, device, compiled, _no_host_reads)


def test_the_guard_catches_a_host_read():
    """The guard is not vacuous: a float() of a scale tensor inside it raises."""
    s = torch.tensor(2.0)
    with pytest.raises(AssertionError, match="host read"):
        with _no_host_reads():
            float(s * 2)
    with pytest.raises(AssertionError, match="host read"):
        with _no_host_reads():
            s.item()
    assert float(s) == 2.0  # restored


def test_eager_scale_check_on_an_accelerator_is_a_device_assert():
    """The accelerator path of the eager scale check still rejects a bad scale (device-side assert:
    RuntimeError on the CPU), and a CPU scale keeps its ValueError."""
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        dgkernels.clip_loss(x, y, torch.tensor(-1.0))
    with _no_host_reads(), pytest.raises(RuntimeError, match="logit_scale must be finite and > 0"):
        dgkernels.clip_loss(x, y, torch.tensor(-1.0))


_EAGER_SYNC_FREE = [c for c in CASES if c != "cosine_cross_entropy"]  # its eager target range check syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_cuda_sync_per_call(case, compiled):
    if not compiled and case not in _EAGER_SYNC_FREE:
        pytest.skip("eager index checks read the targets on the host by design (dgkernels.heads.api)")

    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    for backend in _fused_backends("cuda"):
        _check(case, backend, "cuda", compiled, sync_errors)
