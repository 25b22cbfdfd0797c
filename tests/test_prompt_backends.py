"""Each prompt backend (cpp, triton under the interpreter, cuda on a GPU) against the reference."""
import copy

import pytest
import torch

import dgkernels
from dgkernels import _dispatch, _primitives
from dgkernels.prompt import ops as prompt_ops
from dgkernels.prompt import reference
from dgkernels.prompt.api import OP_ATTENTION
from dgkernels.prompt.reference import naive_encode_prompts
from dgkernels.testing import assert_close_to_fp64, rel_error

import prompt_models as pm

DTYPE_OF = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _available(backend, device="cpu"):
    why = _dispatch.explain(OP_ATTENTION, device)[backend]
    if why:
        pytest.skip(why)


def _loss(feats):
    weights = torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)
    return (feats * weights).sum() + feats.square().sum()


def _run(fn, model, prefix, suffix, lengths, dtype, scale=1.0, **kw):
    p = prefix.to(dtype).requires_grad_()
    s = suffix.to(dtype).requires_grad_()
    feats = fn(model, p, s, lengths, **kw)
    return tuple(t.cpu() for t in (feats, *torch.autograd.grad(_loss(feats) * scale, (p, s))))


def _on(model, device):
    """The cached CPU model, or a copy of it on `device`."""
    return model if torch.device(device).type == "cpu" else copy.deepcopy(model).to(device)


def _compare(backend, precision, g, k, lp, ls, lengths, per_group=False, chunk_size=None, device="cpu",
             baseline="naive", scale=1.0):
    """backend's features and gradients against float64; the allowed error follows from the naive
    encoder at the same precision (baseline="naive") or from the cpp backend (baseline="cpp": the
    float32-internal kernels, for the small-gradient regime where PyTorch's own half path is poor)."""
    dtype = DTYPE_OF[precision]
    model, twin = pm.model("tiny", precision), pm.fp64_twin("tiny", precision)
    prefix = torch.randn(g, lp, 32, dtype=torch.float64) * 0.5
    suffix = torch.randn(*((g,) if per_group else ()), k, ls, 32, dtype=torch.float64) * 0.5
    lengths = torch.tensor(lengths)
    out = _run(dgkernels.encode_prompts, _on(model, device), prefix.to(device), suffix.to(device), lengths, dtype,
               scale, backend=backend, chunk_size=chunk_size)
    if baseline == "naive":
        base = _run(naive_encode_prompts, model, prefix, suffix, lengths, dtype, scale)
    else:
        base = _run(dgkernels.encode_prompts, model, prefix, suffix, lengths, dtype, scale, backend=baseline,
                    chunk_size=chunk_size)
    exact = _run(naive_encode_prompts, twin, prefix, suffix, lengths, torch.float64, scale)
    for o, b, e, what in zip(out, base, exact, ("features", "grad prefix", "grad suffix")):
        assert_close_to_fp64(o, e, b, dtype=dtype, ulps=1.0 if baseline != "naive" else 8.0,
                             name=f"{backend} {what}")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [
    dict(g=1, k=7, lp=17, ls=6, lengths=[1, 6, 3, 2, 5, 4, 6]),
    dict(g=3, k=5, lp=5, ls=5, lengths=[3, 1, 5, 2, 4], chunk_size=4),
    dict(g=2, k=3, lp=1, ls=9, lengths=[9, 5, 7], per_group=True),
])
def test_cpp_encode_prompts(precision, case):
    _available("cpp")
    _compare("cpp", precision, **case)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_triton_encode_prompts(precision, triton_device):
    _available("triton", triton_device)
    # two prefix key blocks and two query blocks (block size 16), an odd K, a chunk boundary
    _compare("triton", precision, g=2, k=3, lp=18, ls=17, lengths=[17, 1, 4], chunk_size=4, device=triton_device)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_triton_small_gradients_keep_fp32_accuracy(precision, triton_device):
    # DESIGN 5.4: the loss scaled by 1e-3 puts the attention's score gradients (order 1e-3 / L
    # times the activations' gradients) near fp16's subnormals; the triton kernels, which cast
    # them for the tensor-core GEMMs, are held to the float32-internal cpp backend's error.
    _available("triton", triton_device)
    _available("cpp")
    _compare("triton", precision, g=2, k=3, lp=18, ls=17, lengths=[17, 1, 4], device=triton_device,
             baseline="cpp", scale=1e-3)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_backend_encode_text(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    _available(backend, device)
    model = pm.model("tiny")
    tokens = pm.random_tokens(3, [2, 9, 20])
    with torch.no_grad():
        out = dgkernels.encode_text(_on(model, device), tokens.to(device), normalize=True, backend=backend).cpu()
        exact = pm.fp64_twin("tiny").encode_text(tokens, normalize=True)
        assert_close_to_fp64(out, exact, model.encode_text(tokens, normalize=True))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backend_gradients_reach_head_weights(backend, triton_device):
    # the head kernels also give ln_final and projection gradients (towers that are not frozen)
    device = triton_device if backend == "triton" else "cpu"
    _available(backend, device)
    model = copy.deepcopy(pm.model("tiny")).to(device).requires_grad_(True)  # PromptEncoder freezes the shared one
    tokens = pm.random_tokens(3, [2, 9, 5]).to(device)
    params = (model.ln_final.weight, model.ln_final.bias, model.text_projection)
    ref = torch.autograd.grad(_loss(dgkernels.encode_text(model, tokens, True, backend="reference")), params)
    out = torch.autograd.grad(_loss(dgkernels.encode_text(model, tokens, True, backend=backend)), params)
    for a, b in zip(out, ref):
        assert rel_error(a, b) < 1e-5


def test_non_contiguous_inputs():
    _available("cpp")
    model = pm.model("tiny")
    prefix = torch.randn(4, 2, 32).transpose(0, 1)  # [2, 4, 32], strided
    suffix = torch.randn(32, 5, 3).permute(2, 1, 0)  # [3, 5, 32], strided
    lengths = torch.tensor([5, 2, 3])
    assert not suffix.is_contiguous() and not prefix.is_contiguous()
    ref = naive_encode_prompts(model, prefix, suffix, lengths)
    for backend in ("reference", "cpp"):
        out = dgkernels.encode_prompts(model, prefix, suffix, lengths, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# low-level ops: float64 gradcheck and opcheck
# ---------------------------------------------------------------------------------------------
def _attention_inputs(dtype=torch.float64):
    torch.manual_seed(3)
    lengths = torch.tensor([3, 1, 4, 2, 3])  # 5 sequences, groups 0 0 1 1 2 (K = 2, last chunked off)
    seq_start = torch.cumsum(lengths, 0) - lengths
    groups = torch.tensor([0, 0, 1, 1, 2])
    t, heads, dim, lp = int(lengths.sum()), 2, 4, 3
    qkv = torch.randn(t, 3, heads, dim, dtype=dtype)
    kvp = torch.randn(3, lp, 2, heads, dim, dtype=dtype)
    return (qkv[:, 0], qkv[:, 1], qkv[:, 2], kvp[:, :, 0], kvp[:, :, 1], seq_start, lengths, groups, 4, 0.5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_attention_gradcheck_fp64(backend):
    if backend != "reference":
        _available(backend)
    impl = prompt_ops.bound(backend)
    q, k, v, kp, vp, *rest = _attention_inputs()
    tensors = [t.clone().requires_grad_() for t in (q, k, v, kp, vp)]
    assert torch.autograd.gradcheck(lambda *x: impl.prefix_attention(*x, *rest), tensors)
    # and the values equal the reference
    torch.testing.assert_close(impl.prefix_attention(q, k, v, kp, vp, *rest),
                               reference.prefix_attention(q, k, v, kp, vp, *rest))


@pytest.mark.parametrize("normalize", [False, True])
def test_head_and_assemble_gradcheck_fp64(normalize):
    _available("cpp")
    impl = prompt_ops.bound("cpp")
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([6, 0, 3])
    ln_w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ln_b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b, p: impl.eot_head(a, rows, w, b, 1e-5, p, None, normalize),
                                    (x, ln_w, ln_b, proj))
    torch.testing.assert_close(impl.eot_head(x, rows, ln_w, ln_b, 1e-5, proj, None, normalize),
                               reference.eot_head(x, rows, ln_w, ln_b, 1e-5, proj, None, normalize))
    asm = prompt_ops.bound("cpp")
    src = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    si, pi = torch.tensor([3, 0, 3, 1]), torch.tensor([0, 1, 4, 4])
    assert torch.autograd.gradcheck(lambda s, p: asm.assemble(s, si, p, pi, torch.float64), (src, pos))


def test_opcheck_custom_op_variants():
    """Variants beyond tests/test_op_registry.py's samples: strided q/k/v views of one packed
    tensor, a head without projection bias, float32 embeddings assembled to bfloat16."""
    _available("cpp")
    ops = _primitives.CUSTOM_OPS
    q, k, v, kp, vp, st, ln, gr, max_len, scale = _attention_inputs(torch.float32)
    torch.library.opcheck(ops["prefix_attention"], (q, k, v, kp, vp, st, ln, gr, max_len, scale, "cpp"))
    x, rows = torch.randn(7, 6), torch.tensor([6, 0, 3])
    w, b, p = torch.randn(6), torch.randn(6), torch.randn(6, 5)
    torch.library.opcheck(ops["eot_head"], (x, rows, w, b, 1e-5, p, None, True, "cpp"))
    torch.library.opcheck(ops["eot_head"], (x, rows, None, None, 1e-5, None, None, False, "cpp"))
    torch.library.opcheck(ops["assemble_tokens"], (torch.randn(4, 6), torch.tensor([3, 0]), torch.randn(5, 6),
                                                   torch.tensor([1, 4]), torch.bfloat16, "cpp"))


def test_named_backend_refusals_say_why():
    with pytest.raises(dgkernels.BackendUnavailableError, match="cuda"):
        dgkernels.encode_prompts(pm.model("tiny"), torch.randn(1, 2, 32), torch.randn(2, 3, 32), torch.tensor([3, 1]),
                                 backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_backends_match_reference(backend, precision):
    dtype = DTYPE_OF[precision]
    model = pm.model("tiny", precision)
    gpu = __import__("copy").deepcopy(model).cuda()
    prefix = torch.randn(3, 17, 32) * 0.5
    suffix = torch.randn(7, 9, 32) * 0.5
    lengths = torch.tensor([9, 1, 4, 6, 3, 2, 8])
    ref = _run(dgkernels.encode_prompts, gpu, prefix.cuda(), suffix.cuda(), lengths, dtype, backend="reference")
    out = _run(dgkernels.encode_prompts, gpu, prefix.cuda(), suffix.cuda(), lengths, dtype, backend=backend)
    exact = _run(naive_encode_prompts, pm.fp64_twin("tiny", precision), prefix.double(), suffix.double(), lengths,
                 torch.float64)
    for o, b, e in zip(out, ref, exact):
        assert_close_to_fp64(o.cpu(), e, b.cpu(), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the CUDA attention op (torch's memory-efficient SDPA kernels over the padded prefix + suffix
# batch; float64 keeps the scalar kernel)
# ---------------------------------------------------------------------------------------------
def _attention_problem(lengths, groups, heads, dim, lp, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    t = int(lengths.sum())
    q, k, v = (torch.randn(t, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    kp, vp = (torch.randn(max(groups) + 1, lp, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    rest = (torch.cumsum(lengths, 0) - lengths, lengths, torch.tensor(groups), int(lengths.max()), dim ** -0.5)
    return (q, k, v, kp, vp), rest


def _attention_run(fn, tensors, rest, dtype, device, scale=1.0):
    leaves = [t.to(device, dtype).requires_grad_() for t in tensors]
    out = fn(*leaves, *[r.to(device) if isinstance(r, torch.Tensor) else r for r in rest])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * w.to(device, dtype)).sum() * scale, leaves)
    return [t.cpu() for t in (out, *grads)]


ATTENTION_CASES = [
    # head dim 12 (zero-padded to 16 for the SDPA kernels), groups shared by several sequences
    dict(lengths=[3, 1, 7, 2, 5], groups=[0, 0, 1, 1, 2], heads=2, dim=12, lp=5),
    # no prefix (plain causal attention), one token sequences
    dict(lengths=[1, 4, 1], groups=[0, 1, 2], heads=3, dim=8, lp=0),
    # longer than the old scalar kernel's 128-token limit, prefix longer than one 64-key block
    dict(lengths=[200, 37], groups=[0, 0], heads=2, dim=64, lp=70),
]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=range(len(ATTENTION_CASES)))
def test_cuda_attention_op_matches_reference(precision, case):
    _available("cuda", "cuda")
    dtype = DTYPE_OF[precision]
    impl = prompt_ops.bound("cuda")
    tensors, rest = _attention_problem(**case)
    exact = _attention_run(reference.prefix_attention, tensors, rest, torch.float64, "cpu")
    base = _attention_run(reference.prefix_attention, tensors, rest, dtype, "cuda")
    out = _attention_run(impl.prefix_attention, tensors, rest, dtype, "cuda")
    for o, b, e, what in zip(out, base, exact, ("out", "dq", "dk", "dv", "dkp", "dvp")):
        assert o.dtype == b.dtype
        assert_close_to_fp64(o, e, b, dtype=dtype, name=f"cuda attention {what}")


@pytest.mark.gpu
def test_cuda_attention_op_float64_keeps_scalar_kernel():
    _available("cuda", "cuda")
    impl = prompt_ops.bound("cuda")
    tensors, rest = _attention_problem(**ATTENTION_CASES[0])
    exact = _attention_run(reference.prefix_attention, tensors, rest, torch.float64, "cpu")
    out = _attention_run(impl.prefix_attention, tensors, rest, torch.float64, "cuda")
    for o, e in zip(out, exact):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_small_gradients_keep_fp32_accuracy(precision):
    # DESIGN 5.4 as for triton: the loss scaled by 1e-3, held to the float32-internal cpp backend
    _available("cuda", "cuda")
    _available("cpp")
    _compare("cuda", precision, g=2, k=3, lp=18, ls=17, lengths=[17, 1, 4], device="cuda", baseline="cpp",
             scale=1e-3)
