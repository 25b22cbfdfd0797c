"""Head ops: every backend against the float64 reference (values and gradients), the reference
against F.cross_entropy, gradcheck, opcheck of the custom-op variants and bad-input errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import dgkernels
from dgkernels import _primitives
from dgkernels.heads import reference as ref
from dgkernels.testing import assert_close_to_fp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _available(backend):
    return dgkernels.backends()[backend].available


def _skip_unless(backend):
    if not _available(backend):
        pytest.skip(dgkernels.backends()[backend].reason)


def _noncontig(t):
    """Same values, strided storage (every other element of a wider buffer)."""
    buf = torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)
    view = buf[..., 0]
    view.copy_(t)
    return view


# ---- problem builders: op -> (args, kwargs, names of differentiable args) -------------------------

def _heads(B, D, K, F_, bias=True):
    x = torch.randn(B, F_)
    w = torch.randn(D, K, F_) / math.sqrt(F_)
    b = torch.randn(D, K) * 0.5 if bias else None
    return x, w, b


def build(op, case):
    B, D, K, F_ = case.get("B", 13), case.get("D", 3), case.get("K", 7), case.get("F", 21)
    if op == "domain_fanout":
        x, w, b = _heads(B, D, K, F_, case.get("bias", True))
        return (x, w, b), {}, [0, 1, 2]
    if op == "domain_cross_entropy":
        x, w, b = _heads(B, D, K, F_, case.get("bias", True))
        dom = torch.randint(0, D, (B,))
        tgt = torch.randint(0, K, (B,))
        kw = {k: case[k] for k in ("all_heads", "reduction", "label_smoothing") if k in case}
        return (x, w, b, dom, tgt), kw, [0, 1, 2]
    if op == "head_agreement":
        x, w, b = _heads(B, D, K, F_, case.get("bias", True))
        kw = {k: case[k] for k in ("kind", "reduction") if k in case}
        return (x, w, b), kw, [0, 1, 2]
    if op == "mapper_project":
        x = torch.randn(B, F_)
        shape = (D, F_, F_) if case.get("per_domain") else (F_, F_)
        w = torch.randn(*shape) / math.sqrt(F_)
        b = torch.randn(*shape[:-1]) * 0.1 if case.get("bias", True) else None
        kw = {k: case[k] for k in ("residual", "normalize") if k in case}
        if case.get("per_domain"):
            kw["domain"] = torch.randint(0, D, (B,))
        return (x, w, b), kw, [0, 1, 2]
    if op == "cosine_cross_entropy":
        x = torch.randn(B, F_)
        c = torch.randn(B, K, F_) if case.get("per_sample") else torch.randn(K, F_)
        scale = torch.tensor(case.get("scale", 7.5))
        tgt = torch.randint(0, K, (B,))
        ii = case.get("ignore_index", -100)
        if case.get("ignore"):
            tgt[::3] = ii
        kw = {k: case[k] for k in ("normalize", "label_smoothing", "reduction") if k in case}
        kw["ignore_index"] = ii
        return (x, c, scale, tgt), kw, [0, 1, 2]
    raise KeyError(op)


def _prepare(op, args, kwargs, diff, dtype, device, noncontig=False):
    """The call's arguments on `device` in the test dtype (logit_scale stays float32, a CLIP
    parameter), the differentiable ones as leaves; optionally non-contiguous views."""
    leaves, call = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            keep32 = op == "cosine_cross_entropy" and i == 2
            t = a.detach().to((torch.float64 if dtype == torch.float64 else torch.float32) if keep32 else dtype)
            t = t.to(device)
            if noncontig and t.dim() >= 1:
                t = _noncontig(t)  # on the device: .to() of a strided view would copy it dense
            if i in diff:
                t.requires_grad_(True)
                leaves.append(t)
            call.append(t)
        else:
            call.append(a.to(device) if isinstance(a, torch.Tensor) else a)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return leaves, call, kwargs


def run(op, args, kwargs, diff, dtype, backend, noncontig=False, seed=1, device="cpu"):
    """Output and gradients of sum(out * r) w.r.t. the differentiable args (r fixed random)."""
    leaves, call, kwargs = _prepare(op, args, kwargs, diff, dtype, device, noncontig)
    out = getattr(dgkernels, op)(*call, **kwargs, backend=backend)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device, out.dtype)
    grads = torch.autograd.grad((out * r).sum(), leaves)
    return out.cpu(), [t.cpu() for t in grads]


def compare(op, case, backend, dtype, noncontig=False, device="cpu"):
    torch.manual_seed(case.get("seed", 0))
    args, kwargs, diff = build(op, case)
    exp_out, exp_g = run(op, args, kwargs, diff, torch.float64, "reference")
    base_out, base_g = run(op, args, kwargs, diff, dtype, "reference", device=device)
    out, grads = run(op, args, kwargs, diff, dtype, backend, noncontig=noncontig, device=device)
    assert out.dtype == base_out.dtype, (out.dtype, base_out.dtype)
    assert_close_to_fp64(out, exp_out, base_out, dtype=dtype, name=f"{op} value")
    for k, (a, e, bl) in enumerate(zip(grads, exp_g, base_g)):
        assert a.dtype == bl.dtype
        assert_close_to_fp64(a, e, bl, dtype=dtype, name=f"{op} grad {k}")


CASES = [
    ("domain_fanout", {}),
    ("domain_fanout", {"bias": False, "B": 1}),
    ("domain_cross_entropy", {}),
    ("domain_cross_entropy", {"label_smoothing": 0.1, "reduction": "sum", "bias": False}),
    ("domain_cross_entropy", {"all_heads": True, "reduction": "none"}),
    ("domain_cross_entropy", {"all_heads": True, "label_smoothing": 0.2, "D": 5}),
    ("head_agreement", {}),
    ("head_agreement", {"kind": "sym_kl", "reduction": "none", "bias": False}),
    ("head_agreement", {"kind": "sym_kl", "D": 2}),
    ("mapper_project", {}),
    ("mapper_project", {"residual": False, "normalize": False, "bias": False}),
    ("mapper_project", {"per_domain": True}),
    ("mapper_project", {"per_domain": True, "residual": False}),
    ("cosine_cross_entropy", {}),
    ("cosine_cross_entropy", {"ignore": True, "label_smoothing": 0.1}),
    ("cosine_cross_entropy", {"normalize": False, "scale": 0.3, "reduction": "sum"}),
    ("cosine_cross_entropy", {"per_sample": True, "ignore": True, "ignore_index": 3, "K": 9}),
    ("cosine_cross_entropy", {"per_sample": True, "label_smoothing": 0.05, "reduction": "none"}),
]
IDS = [f"{op}-{'-'.join(f'{k}={v}' for k, v in c.items()) or 'default'}" for op, c in CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,case", CASES, ids=IDS)
def test_cpp_matches_reference(op, case, dtype):
    _skip_unless("cpp")
    compare(op, case, "cpp", dtype)


@pytest.mark.parametrize("op,case", CASES, ids=IDS)
def test_cpp_noncontiguous(op, case):
    _skip_unless("cpp")
    compare(op, case, "cpp", torch.float32, noncontig=True)


# Several row blocks (C++ tiles: max(1024, 2**20 // logits per row) rows: 1024 at D*K = 1725,
# 3039 at K = 345).
BIG = [
    ("domain_cross_entropy", {"B": 1100, "D": 5, "K": 345, "F": 4, "all_heads": True}),
    ("domain_cross_entropy", {"B": 6200, "D": 2, "K": 345, "F": 4, "label_smoothing": 0.1}),
    ("head_agreement", {"B": 1100, "D": 5, "K": 345, "F": 4}),
    ("head_agreement", {"B": 1100, "D": 5, "K": 345, "F": 4, "kind": "sym_kl"}),
    ("cosine_cross_entropy", {"B": 3100, "K": 345, "F": 4, "ignore": True}),
    ("cosine_cross_entropy", {"B": 64, "K": 1500, "F": 8, "per_sample": True}),
]


@pytest.mark.parametrize("op,case", BIG, ids=[f"{op}-{i}" for i, (op, _) in enumerate(BIG)])
def test_cpp_multiblock(op, case):
    _skip_unless("cpp")
    compare(op, case, "cpp", torch.float32)


TRITON_CASES = [(op, dict(c, B=5)) for op, c in CASES if not c.get("D") == 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,case", TRITON_CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(TRITON_CASES)])
def test_triton_matches_reference(op, case, dtype, triton_device):
    _skip_unless("triton")
    compare(op, case, "triton", dtype, noncontig=dtype == torch.float32, device=triton_device)


GPU_CASES = CASES + [(op, dict(c, B=300, K=345, D=5, F=512)) for op, c in CASES if op != "mapper_project"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,case", GPU_CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(GPU_CASES)])
def test_gpu_matches_reference(op, case, dtype, backend):
    _skip_unless(backend)
    compare(op, case, backend, dtype, noncontig=dtype == torch.float32, device="cuda")


# Triton cosine CE: several row/class blocks of the fused kernels (16 x 32 float32, 64 x 64 half
# precision), two feature blocks of the gradient kernels (256 features each), and the row-tile
# fallback for features wider than 512.
TRITON_COSINE = [
    {"B": 37, "K": 70, "F": 21, "ignore": True, "label_smoothing": 0.1},
    {"B": 70, "K": 131, "F": 21, "ignore": True},
    {"B": 20, "K": 40, "F": 300, "label_smoothing": 0.1},
    {"B": 3, "K": 5, "F": 530},
    {"B": 2, "K": 11, "F": 1100, "per_sample": True},  # 8-class chunks of 2048 features
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TRITON_COSINE,
                         ids=["blocks", "half-blocks", "feature-blocks", "wide", "per-sample-wide"])
def test_triton_cosine_blocks_and_fallback(case, dtype, triton_device):
    _skip_unless("triton")
    compare("cosine_cross_entropy", case, "triton", dtype, device=triton_device)


# ---- the reference itself ------------------------------------------------------------------------

@pytest.mark.parametrize("ls", [0.0, 0.15])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_cosine_ce_matches_explicit_logits(ls, reduction, per_sample):
    B, K, E = 11, 6, 9
    x = torch.randn(B, E, dtype=torch.float64)
    c = torch.randn(B, K, E, dtype=torch.float64) if per_sample else torch.randn(K, E, dtype=torch.float64)
    s = torch.tensor(4.0, dtype=torch.float64)
    t = torch.randint(0, K, (B,))
    t[1] = t[7] = -100
    xn = x / x.norm(dim=-1, keepdim=True)
    cn = c / c.norm(dim=-1, keepdim=True)
    logits = s * (torch.einsum("be,bke->bk", xn, cn) if per_sample else xn @ cn.T)
    want = F.cross_entropy(logits, t, reduction=reduction, label_smoothing=ls)
    backends = ["reference"] + (["cpp"] if _available("cpp") else [])
    for backend in backends:
        got = dgkernels.cosine_cross_entropy(x, c, s, t, reduction=reduction, label_smoothing=ls, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=backend)


def test_domain_ce_matches_per_head_cross_entropy():
    B, D, K, F_ = 10, 3, 5, 4
    x, w, b = _heads(B, D, K, F_)
    dom = torch.randint(0, D, (B,))
    t = torch.randint(0, K, (B,))
    own = torch.stack([x[i] @ w[dom[i]].T + b[dom[i]] for i in range(B)])
    torch.testing.assert_close(ref.domain_cross_entropy(x, w, b, dom, t, label_smoothing=0.1),
                               F.cross_entropy(own, t, label_smoothing=0.1))
    heads = [F.cross_entropy(x @ w[d].T + b[d], t, reduction="none") for d in range(D)]
    torch.testing.assert_close(ref.domain_cross_entropy(x, w, b, None, t, all_heads=True), torch.stack(heads).mean())


def test_head_agreement_definitions():
    B, D, K, F_ = 6, 4, 5, 3
    x, w, b = _heads(B, D, K, F_)
    x, w, b = x.double(), w.double(), b.double()
    p = torch.softmax(torch.einsum("bf,dkf->bdk", x, w) + b, -1)
    m = p.mean(1)
    kl = lambda a, c: (a * (a.log() - c.log())).sum(-1)  # noqa: E731
    js = torch.stack([kl(p[:, d], m) for d in range(D)], 1).mean(1)
    ent = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(ref.head_agreement(x, w, b, reduction="none"), js)
    torch.testing.assert_close(js, ent(m) - torch.stack([ent(p[:, d]) for d in range(D)], 1).mean(1))
    pairs = [kl(p[:, d], p[:, e]) + kl(p[:, e], p[:, d]) for d in range(D) for e in range(d + 1, D)]
    torch.testing.assert_close(ref.head_agreement(x, w, b, kind="sym_kl", reduction="none"),
                               torch.stack(pairs, 1).mean(1))
    # identical heads agree perfectly
    same = w[:1].expand(D, K, F_).contiguous()
    for backend in ["reference"] + (["cpp"] if _available("cpp") else []):
        for kind in ("kl", "sym_kl"):
            v = dgkernels.head_agreement(x, same, None, kind=kind, backend=backend)
            assert abs(float(v)) < 1e-12, (backend, kind)


# ---- gradcheck, opcheck ----------------------------------------------------------------------------

GRADCHECK = [
    ("domain_fanout", {}), ("domain_cross_entropy", {"label_smoothing": 0.1}),
    ("domain_cross_entropy", {"all_heads": True}), ("head_agreement", {}), ("head_agreement", {"kind": "sym_kl"}),
    ("mapper_project", {}), ("mapper_project", {"per_domain": True, "residual": False}),
    ("cosine_cross_entropy", {"ignore": True, "label_smoothing": 0.1}),
    ("cosine_cross_entropy", {"per_sample": True}),
]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("op,case", GRADCHECK, ids=[f"{op}-{i}" for i, (op, _) in enumerate(GRADCHECK)])
def test_gradcheck_float64(op, case, backend):
    _skip_unless(backend)
    torch.manual_seed(3)
    args, kwargs, diff = build(op, dict(case, B=5, D=3, K=4, F=6))
    args = [a.double().requires_grad_(i in diff) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for i, a in enumerate(args)]
    fn = lambda *a: getattr(dgkernels, op)(*a, **kwargs, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-6)


def _opcheck_samples():
    """Variants beyond tests/test_op_registry.py's samples: no bias, all heads, per-domain maps,
    per-sample class embeddings, a one-element scale, another ignore_index."""
    x, w, b = _heads(6, 3, 5, 7)
    dom = torch.tensor([0, 2, 1, 1, 0, 2])
    t = torch.tensor([4, 0, 1, 3, 2, 0])
    m = torch.randn(7, 7)
    c = torch.randn(5, 7)
    cs = torch.randn(6, 5, 7)
    s = torch.tensor(3.0)
    g6 = torch.randn(6)
    ops = _primitives.CUSTOM_OPS
    out, norm = ops["mapper_project_rows"](x, m, None, None, True, True, "cpp")
    outd, normd = ops["mapper_project_rows"](x, torch.randn(3, 7, 7), torch.randn(3, 7), dom, False, True, "cpp")
    return [
        ("domain_fanout", (x, w, None)),
        ("domain_cross_entropy_rows_backward", (g6, x, w, None, None, t, True, 0.0)),
        ("head_agreement_rows", (x, w, b, 0)), ("head_agreement_rows_backward", (g6, x, w, None, 1)),
        ("mapper_project_rows", (x, m, None, None, True, True)),
        ("mapper_project_rows_backward", (torch.randn(6, 7), x, m, None, out, norm, True, True)),
        ("mapper_project_rows_backward", (torch.randn(6, 7), x, torch.randn(3, 7, 7), dom, outd, normd, False, True)),
        ("cosine_cross_entropy_rows", (x, c, s, t, True, 0.1, -100)),
        ("cosine_cross_entropy_rows_backward", (g6, x, cs, s.reshape(1), t, False, 0.0, 2)),
        ("domain_cross_entropy_fused", (x, w, b, dom, t, False, 0.1, "sum")),
    ]


def test_opcheck_custom_op_variants():
    _skip_unless("cpp")
    for name, args in _opcheck_samples():
        torch.library.opcheck(_primitives.CUSTOM_OPS[name], (*args, "cpp"))


# ---- bad inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs(backend):
    _skip_unless(backend)
    x, w, b = _heads(4, 3, 5, 6)
    dom = torch.tensor([0, 1, 2, 1])
    t = torch.tensor([0, 4, 1, 2])
    kw = {"backend": backend}
    with pytest.raises(ValueError, match="domain values"):
        dgkernels.domain_cross_entropy(x, w, b, torch.tensor([0, 1, 3, 1]), t, **kw)
    with pytest.raises(ValueError, match="domain values"):
        dgkernels.domain_cross_entropy(x, w, b, torch.tensor([0, -1, 2, 1]), t, **kw)
    with pytest.raises(ValueError, match="target values"):
        dgkernels.domain_cross_entropy(x, w, b, dom, torch.tensor([0, 5, 1, 2]), **kw)
    with pytest.raises(ValueError, match="target values"):
        dgkernels.cosine_cross_entropy(x, torch.randn(5, 6), 2.0, torch.tensor([0, 5, 1, -100]), **kw)
    with pytest.raises(ValueError, match="domain"):
        dgkernels.mapper_project(x, torch.randn(3, 6, 6), domain=torch.tensor([0, 1, 2, 3]), **kw)
    with pytest.raises(ValueError, match="disagree on F"):
        dgkernels.domain_fanout(x, w[..., :5], None, **kw)
    with pytest.raises(ValueError, match="bias"):
        dgkernels.head_agreement(x, w, b[:, :4], **kw)
    with pytest.raises(ValueError, match="4 entries"):
        dgkernels.domain_cross_entropy(x, w, b, dom[:3], t, **kw)
    with pytest.raises(ValueError, match="class_embeds"):
        dgkernels.cosine_cross_entropy(x, torch.randn(5, 5, 6), 2.0, t, **kw)
    with pytest.raises(ValueError, match="square"):
        dgkernels.mapper_project(x, torch.randn(5, 6), **kw)
    with pytest.raises(TypeError, match="floating"):
        dgkernels.domain_fanout(x.long(), w, b, **kw)
    with pytest.raises(TypeError, match="integer"):
        dgkernels.domain_cross_entropy(x, w, b, dom.float(), t, **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        dgkernels.domain_fanout(x.double(), w, b, **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        dgkernels.cosine_cross_entropy(x, torch.randn(5, 6).half(), 2.0, t, **kw)
    with pytest.raises(ValueError, match="one device"):
        dgkernels.domain_fanout(x, w.to("meta"), b, **kw)
    with pytest.raises(ValueError, match="one device"):
        dgkernels.cosine_cross_entropy(x, torch.randn(5, 6), 2.0, t.to("meta"), **kw)
    with pytest.raises(ValueError, match="logit_scale"):
        dgkernels.cosine_cross_entropy(x, torch.randn(5, 6), -1.0, t, **kw)
    with pytest.raises(ValueError, match="kind"):
        dgkernels.head_agreement(x, w, b, kind="js", **kw)
    with pytest.raises(ValueError, match="2 heads"):
        dgkernels.head_agreement(x, w[:1], b[:1], kind="sym_kl", **kw)
    with pytest.raises(ValueError, match="label_smoothing"):
        dgkernels.domain_cross_entropy(x, w, b, dom, t, label_smoothing=1.5, **kw)
    with pytest.raises(ValueError, match="reduction"):
        dgkernels.cosine_cross_entropy(x, torch.randn(5, 6), 2.0, t, reduction="avg", **kw)


def test_all_ignored_mean_is_nan_like_torch():
    x, c = torch.randn(3, 4), torch.randn(5, 4)
    t = torch.full((3,), -100)
    for backend in ["reference"] + (["cpp"] if _available("cpp") else []):
        assert torch.isnan(dgkernels.cosine_cross_entropy(x, c, 2.0, t, backend=backend))


def test_triton_refuses_float64_and_too_large_agreement(triton_device):
    # on the triton device: on a CUDA machine CPU tensors would be refused for their device first.
    # The automatic fall-through past these refusals: tests/test_backend_support.py.
    if not _available("triton"):
        pytest.skip("triton cannot run here")
    x, w, b = (t.double().to(triton_device) for t in _heads(4, 3, 5, 6))
    with pytest.raises(dgkernels.BackendUnavailableError, match="float64"):
        dgkernels.domain_fanout(x, w, b, backend="triton")
    x, w, b = _heads(2, 64, 1000, 4)
    with pytest.raises(dgkernels.BackendUnavailableError, match="D x K"):
        dgkernels.head_agreement(x.to(triton_device), w.to(triton_device), b.to(triton_device), backend="triton")


# ---- the small-gradient regime (DESIGN 5.4) ----------------------------------------------------------
# Upstream gradients scaled by 1e-3 (and 1/B for reduction='none') give the magnitudes of a batch
# far larger than the test's: gradient-of-logit values of order 1e-3 / (B K) sit below fp16's normal
# range. PyTorch's own fp16 composition is just as poor there, so a fused kernel with float32
# accumulation is held to the float32-internal cpp backend's error instead.

SMALL_GRAD = [
    ("domain_fanout", {"B": 48, "D": 3, "K": 37, "F": 32}),
    ("domain_cross_entropy", {"B": 48, "D": 3, "K": 97, "F": 32, "reduction": "none"}),
    ("domain_cross_entropy", {"B": 48, "D": 3, "K": 97, "F": 32, "all_heads": True, "label_smoothing": 0.1}),
    ("head_agreement", {"B": 48, "D": 3, "K": 97, "F": 32, "reduction": "none"}),
    ("head_agreement", {"B": 48, "D": 3, "K": 97, "F": 32, "kind": "sym_kl"}),
    ("mapper_project", {"B": 48, "F": 32}),
    ("mapper_project", {"B": 48, "D": 3, "F": 32, "per_domain": True, "residual": False}),
    ("cosine_cross_entropy", {"B": 48, "K": 97, "F": 32, "reduction": "none", "ignore": True}),
    ("cosine_cross_entropy", {"B": 48, "K": 97, "F": 32, "label_smoothing": 0.1}),
    ("cosine_cross_entropy", {"B": 4, "K": 97, "F": 520, "reduction": "none"}),  # row-tile path (E > 512)
    ("cosine_cross_entropy", {"B": 16, "K": 97, "F": 32, "per_sample": True, "reduction": "none"}),
]


def run_small(op, args, kwargs, diff, dtype, backend, device="cpu"):
    """Like run(), with the upstream gradient scaled by 1e-3 (and by 1/B per sample)."""
    leaves, call, kwargs = _prepare(op, args, kwargs, diff, dtype, device)
    out = getattr(dgkernels, op)(*call, **kwargs, backend=backend)
    if out.dim() == 0:
        loss = out * 1e-3
    else:
        g = torch.Generator().manual_seed(1)
        r = torch.randn(out.shape, generator=g, dtype=torch.float64) * (1e-3 / out.shape[0])
        loss = (out * r.to(device, out.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.cpu(), [t.cpu() for t in grads]


def compare_small(op, case, backend, dtype, device):
    torch.manual_seed(case.get("seed", 0))
    args, kwargs, diff = build(op, case)
    exact = run_small(op, args, kwargs, diff, torch.float64, "reference")
    base = run_small(op, args, kwargs, diff, dtype, "cpp")
    got = run_small(op, args, kwargs, diff, dtype, backend, device=device)
    names = ["value"] + [f"grad {k}" for k in range(len(diff))]
    for a, e, b, what in zip([got[0], *got[1]], [exact[0], *exact[1]], [base[0], *base[1]], names):
        assert_close_to_fp64(a, e, b, dtype=dtype, ulps=1.0, name=f"{op} {backend} {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,case", SMALL_GRAD, ids=[f"{op}-{i}" for i, (op, _) in enumerate(SMALL_GRAD)])
def test_triton_small_gradients_keep_fp32_accuracy(op, case, dtype, triton_device):
    _skip_unless("triton")
    _skip_unless("cpp")
    compare_small(op, case, "triton", dtype, triton_device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,case", SMALL_GRAD, ids=[f"{op}-{i}" for i, (op, _) in enumerate(SMALL_GRAD)])
def test_cuda_small_gradients_keep_fp32_accuracy(op, case, dtype):
    _skip_unless("cuda")
    _skip_unless("cpp")
    compare_small(op, case, "cuda", dtype, "cuda")


# ---- 64-bit offsets --------------------------------------------------------------------------------
def test_triton_row_offsets_pass_2_31(triton_device):
    # features rows 2**30 + 16 elements apart: row 2 starts past 2**31 elements, where a 32-bit
    # rows * stride product wraps (to a wrong row, or outside the buffer). The storage is virtual
    # memory; only the three rows' pages are touched.
    _skip_unless("triton")
    B, F_, D, K = 3, 8, 2, 5
    stride = (1 << 30) + 16
    x = torch.randn(B, F_).half()
    buf = torch.empty((B - 1) * stride + F_, dtype=torch.float16, device=triton_device)
    view = buf.as_strided((B, F_), (stride, 1))
    view.copy_(x)
    w = (torch.randn(D, K, F_) / 3).half().to(triton_device)
    b = torch.randn(D, K).half().to(triton_device)
    want = dgkernels.domain_fanout(x.to(triton_device), w, b, backend="triton")
    got = dgkernels.domain_fanout(view, w, b, backend="triton")
    assert torch.equal(got, want)
    t = torch.randint(0, K, (B,), device=triton_device)
    want = dgkernels.domain_cross_entropy(x.to(triton_device), w, b, None, t, all_heads=True, backend="triton")
    got = dgkernels.domain_cross_entropy(view, w, b, None, t, all_heads=True, backend="triton")
    assert torch.equal(got, want)


def test_triton_fp32_products_follow_torch_matmul_precision():
    # float32 inputs multiply as torch would: IEEE at 'highest' (the default), TF32 otherwise
    _skip_unless("triton")
    from dgkernels.heads.triton import _common
    from dgkernels.prompt import triton as prompt_triton
    old = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert _common.fp32_precision() == want
            # half-precision launches keep the one PREC their COMPILE_SPECS compile
            assert _common.launch_prec(torch.float32) == want
            assert _common.launch_prec(torch.bfloat16) == _common.launch_prec(torch.float16) == "ieee"
            assert prompt_triton._prec(torch.float32) == want
    finally:
        torch.set_float32_matmul_precision(old)
