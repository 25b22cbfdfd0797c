"""Tests driven by the op registry: every custom op (dgkernels._primitives.CUSTOM_OPS) and every
backend registered for its primitive (dgkernels._dispatch) gets them, so registering a primitive
with its reference brings its tests; the only thing to add here is a sample of its inputs
(SAMPLES: a primitive without one fails `test_every_custom_op_has_a_sample`).

  - torch.library.opcheck of every custom op with every fused backend that runs here (schema,
    fake kernel, autograd registration, AOT dispatch);
  - each fused backend's forward primitive against the reference's primitive of the same name:
    values and gradients for float32 / bfloat16 / float16 against a float64 reference, odd sizes,
    non-contiguous inputs, and the small-gradient regime (upstream gradient scaled by 1e-3);
    tolerances from dgkernels.testing (2x PyTorch's own low-precision error + a few ulps);
  - GPU-marked: the same on CUDA tensors for the triton and cuda backends.
"""
from __future__ import annotations

import pytest
import torch

import dgkernels
from dgkernels import _dispatch, _primitives
from dgkernels.testing import assert_close_to_fp64

F64 = torch.float64
LOW = (torch.float32, torch.bfloat16, torch.float16)


def _f(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def _i(*values):
    return torch.tensor(values)


# ---- samples: forward primitives (float64 on the CPU; the tests cast and move them) -------------
def _lse(gen, cols=True, diag=False):
    n = 7
    return (_f(gen, n, 5), _f(gen, n if diag else 6, 5), torch.tensor(2.5, dtype=F64), diag, cols)


def _heads(gen, bias=True):
    return _f(gen, 5, 12), _f(gen, 3, 4, 12, scale=0.5), (_f(gen, 3, 4) if bias else None)


def _tokens(gen):
    return _f(gen, 6, 8), _i(5, 0, 2, 2, 1, 3, 4), _f(gen, 9, 8), _i(0, 1, 2, 3, 0, 1, 2), F64


def _attention(gen):
    t, h, d, g, lp = 9, 2, 8, 2, 3
    q, k, v = (_f(gen, t, h, d) for _ in range(3))
    kp, vp = (_f(gen, g, lp, h, d) for _ in range(2))
    return q, k, v, kp, vp, _i(0, 4, 6), _i(4, 2, 3), _i(0, 1, 1), 4, d ** -0.5


def _head(gen, proj=True, normalize=True):
    return (_f(gen, 7, 8), _i(6, 0, 3), 1 + 0.1 * _f(gen, 8), 0.1 * _f(gen, 8), 1e-5,
            (_f(gen, 8, 6) if proj else None), (_f(gen, 6) if proj else None), normalize)


# name -> (inputs builder, number of outputs compared with the reference's)
FORWARD = {
    "contrastive_lse": (lambda gen: _lse(gen), 2),
    "domain_fanout": (lambda gen: _heads(gen), 1),
    "domain_cross_entropy_rows": (lambda gen: (*_heads(gen), _i(0, 1, 2, 1, 0), _i(3, 0, 1, 2, 3), False, 0.1), 1),
    "head_agreement_rows": (lambda gen: (*_heads(gen), 1), 1),
    "mapper_project_rows": (lambda gen: (_f(gen, 5, 12), _f(gen, 3, 12, 12, scale=0.3), _f(gen, 3, 12),
                                         _i(0, 1, 2, 1, 0), True, True), 1),
    "cosine_cross_entropy_rows": (lambda gen: (_f(gen, 5, 12), _f(gen, 4, 12), torch.tensor(12.0, dtype=F64),
                                               _i(3, 0, 1, -100, 3), True, 0.1, -100), 1),
    "assemble_tokens": (_tokens, 1),
    "prefix_attention": (_attention, 1),
    "eot_head": (_head, 1),
}


def _backward_args(name, gen, backend, dtype, device):
    """Inputs of a backward primitive: its forward primitive's inputs and outputs on `backend`."""
    run = lambda prim, *a: _primitives.CUSTOM_OPS[prim](*_cast(a, dtype, device), backend)  # noqa: E731
    if name == "contrastive_lse_backward":
        q, k, s, diag, cols = _lse(gen)
        lse_r, lse_c = run("contrastive_lse", q, k, s, diag, cols)
        return q, k, s, diag, lse_r, lse_c, _f(gen, 7), _f(gen, 6)
    if name == "domain_fanout_backward":
        x, w, _ = _heads(gen)
        return _f(gen, 5, 3, 4), x, w, True
    if name.endswith("_rows_backward") and name != "mapper_project_rows_backward":
        args = FORWARD[name[:-len("_backward")]][0](gen)
        return (_f(gen, args[0].shape[0]), *args)
    if name == "mapper_project_rows_backward":
        x, w, b, d, res, norm = FORWARD["mapper_project_rows"][0](gen)
        out, nrm = run("mapper_project_rows", x, w, b, d, res, norm)
        return _f(gen, *out.shape), x, w, d, out, nrm, res, norm
    if name == "index_add_rows":
        return _f(gen, 7, 8), _i(5, 0, 2, 2, 1, 3, 4), 6
    if name == "prefix_attention_backward":
        args = _attention(gen)
        out, lse = run("prefix_attention", *args)
        return (_f(gen, *out.shape), *args[:5], out, lse, *args[5:])
    if name == "eot_head_backward":
        x, rows, lw, lb, eps, p, pb, norm = _head(gen)
        out, y, z, mean, rstd = run("eot_head", x, rows, lw, lb, eps, p, pb, norm)
        return _f(gen, *out.shape), x, rows, lw, eps, p, y, z, mean, rstd, norm
    raise KeyError(name)


COMPOSITE = {"domain_cross_entropy_fused": "domain_cross_entropy_rows", "head_agreement_fused": "head_agreement_rows",
             "cosine_cross_entropy_fused": "cosine_cross_entropy_rows"}


def _sample(name, gen, backend, dtype, device="cpu"):
    if name in FORWARD:
        args = FORWARD[name][0](gen)
    elif name in COMPOSITE:
        args = (*FORWARD[COMPOSITE[name]][0](gen), "mean")
    else:
        args = _backward_args(name, gen, backend, dtype, device)
    return _cast(args, dtype, device)


def _primitive(name):
    return COMPOSITE.get(name, name)


def _cast(args, dtype, device, *, grad=False, noncontig=False):
    """Floating tensors to `dtype` (scales stay float32/64 as the public ops pass them), on
    `device`; optionally as non-contiguous views, optionally requiring grad."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach().to(dtype if a.dim() else (F64 if dtype == F64 else torch.float32))
            if noncontig and t.dim() >= 1:
                t = torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]  # stride 2, poisoned gaps
            t = t.to(device)
            out.append(t.requires_grad_(grad))
        elif isinstance(a, torch.Tensor):
            out.append(a.to(device))
        elif isinstance(a, torch.dtype):
            out.append(dtype)
        else:
            out.append(a)
    return out


def _fused_backends(name, device):
    prim = _primitive(name)
    return [b for b in _dispatch.implemented(prim)
            if b != "reference" and not _dispatch.explain(prim, device)[b]]


def _cases(device):
    return [(n, b) for n in sorted(_primitives.CUSTOM_OPS) for b in _fused_backends(n, device)]


def test_every_custom_op_has_a_sample():
    ops = set(_primitives.CUSTOM_OPS)
    assert ops, "no custom op registered"
    missing = [n for n in ops if n not in FORWARD and n not in COMPOSITE
               and not n.endswith("_backward") and n != "index_add_rows"]
    assert not missing, f"custom ops without a sample in tests/test_op_registry.py: {missing}"


def test_every_registered_primitive_is_a_custom_op_in_the_namespace():
    for prim in _dispatch.registered_primitives():
        if prim.startswith("_"):  # probes of other tests
            continue
        assert prim in _primitives.CUSTOM_OPS, prim
        assert hasattr(torch.ops.dgkernels, prim), prim
        fused = set(dgkernels.BACKENDS) - {"reference"}
        assert fused <= set(_dispatch.implemented(prim)), prim
        if prim in FORWARD:
            assert "reference" in _dispatch.implemented(prim), prim


def _opcheck(name, backend, device):
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if backend == "triton" else F64  # the triton kernels run float32 at most
    args = _sample(name, gen, backend, dtype, device)
    torch.library.opcheck(_primitives.CUSTOM_OPS[name], (*args, backend))


@pytest.mark.parametrize("name,backend", _cases("cpu"))
def test_opcheck(name, backend):
    _opcheck(name, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name,backend", _cases("cuda") if torch.cuda.is_available()
                         else [(n, b) for n in sorted(_primitives.CUSTOM_OPS) for b in ("cuda", "triton")])
def test_opcheck_gpu(name, backend):
    _opcheck(name, backend, "cuda")


def _outputs(out, n):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out[:n])


def _values_and_grads(fn, args, n_out, weights, scale):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = _outputs(fn(*args), n_out)
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights)) * scale
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def _check_against_reference(name, backend, dtype, device, *, noncontig=False, scale=1.0):
    gen = torch.Generator().manual_seed(1)
    base = FORWARD[name][0](gen)
    n_out = FORWARD[name][1]
    reference = _dispatch.impl_of(name, "reference").primitive(name)
    op = _primitives.CUSTOM_OPS[name]
    want_outs = _outputs(reference(*_cast(base, F64, "cpu")), n_out)
    weights = [torch.randn(o.shape, generator=gen, dtype=F64) for o in want_outs]
    exact = _values_and_grads(reference, _cast(base, F64, "cpu", grad=True), n_out, weights, scale)
    torch_low = _values_and_grads(reference, _cast(base, dtype, device, grad=True), n_out, weights, scale)
    got = _values_and_grads(lambda *a: op(*a, backend), _cast(base, dtype, device, grad=True, noncontig=noncontig),
                            n_out, weights, scale)
    for i, (g, w, b) in enumerate(zip(got, exact, torch_low)):
        assert_close_to_fp64(g.cpu(), w, b.cpu(), dtype=dtype, name=f"{name}[{backend}] output/grad {i}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,backend", [c for c in _cases("cpu") if c[0] in FORWARD])
def test_primitive_matches_reference(name, backend, dtype):
    _check_against_reference(name, backend, dtype, "cpu")


@pytest.mark.parametrize("name,backend", [c for c in _cases("cpu") if c[0] in FORWARD])
def test_primitive_non_contiguous_and_small_gradient(name, backend):
    _check_against_reference(name, backend, torch.float32, "cpu", noncontig=True, scale=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,backend", [c for c in _cases("cuda") if c[0] in FORWARD] if torch.cuda.is_available()
                         else [(n, b) for n in FORWARD for b in ("cuda", "triton")])
def test_primitive_matches_reference_gpu(name, backend, dtype):
    _check_against_reference(name, backend, dtype, "cuda")
    _check_against_reference(name, backend, dtype, "cuda", noncontig=True, scale=1e-3)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,backend", [c for c in _cases("cpu") if c[0] in COMPOSITE])
def test_fused_loss_matches_reference(name, backend, dtype):
    """A reduced loss's fused forward + backward op: the mean loss and the gradients it returns
    against autograd of the reference's per-sample primitive."""
    gen = torch.Generator().manual_seed(2)
    base = FORWARD[COMPOSITE[name]][0](gen)
    reference = _dispatch.impl_of(COMPOSITE[name], "reference").primitive(COMPOSITE[name])

    def ref_loss(*args):
        per = reference(*args)
        count = (args[3] != args[6]).sum() if name.startswith("cosine") else per.shape[0]
        return per.sum() / count

    def grads(fn, args):
        leaves = [a for a in args[:3] if isinstance(a, torch.Tensor) and a.requires_grad]
        loss = fn(*args)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    exact = grads(ref_loss, _cast(base, F64, "cpu", grad=True))
    torch_low = grads(ref_loss, _cast(base, dtype, "cpu", grad=True))
    got = list(_primitives.CUSTOM_OPS[name](*_cast(base, dtype, "cpu"), "mean", backend))
    for i, (g, w, b) in enumerate(zip(got, exact, torch_low)):
        assert_close_to_fp64(g, w, b, dtype=dtype, name=f"{name}[{backend}] loss/grad {i}")


def test_explain_takes_the_public_ops_and_the_old_primitive_names():
    assert dgkernels.explain("encode_prompts", "cpu") == dgkernels.explain("prefix_attention", "cpu")
    with pytest.deprecated_call():
        assert dgkernels.explain("prompt_prefix_attention", "cpu") == dgkernels.explain("prefix_attention", "cpu")
