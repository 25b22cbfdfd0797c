"""Each backend is one declaration per (family, backend) (`_dispatch.Backend`: devices, dtypes, size
limits, each refusal with its reason); `_dispatch` alone decides and explains from them.

No GPU needed: the dispatch decisions for CUDA tensors are checked with every backend's machine
availability forced on (`_dispatch._status`), which leaves the backends' own declarations to decide.
"""
import pathlib
import re
from types import SimpleNamespace

import pytest
import torch

import dgkernels
from dgkernels import _dispatch, _extension
from dgkernels._dispatch import BackendStatus, BackendUnavailableError, CallFacts, call_facts

PACKAGE = pathlib.Path(dgkernels.__file__).parent
CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU
F32, F64 = torch.float32, torch.float64


def _triton_importable():
    return _dispatch._triton_import_reason() == ""


needs_triton_import = pytest.mark.skipif(not _triton_importable(), reason="triton does not import here")


@pytest.fixture
def all_available(monkeypatch):
    """Every backend usable on this machine, so only device types and declarations decide."""
    monkeypatch.setattr(_dispatch, "_status", lambda name: BackendStatus(name, True))
    monkeypatch.delenv("DGKERNELS_BACKEND", raising=False)


# ---- the declarations -----------------------------------------------------------------------

def _registered():
    return [(p, name) for p in _dispatch.registered_primitives() for name in _dispatch.implemented(p)]


def test_every_op_family_registers_every_backend():
    prims = set(_dispatch.registered_primitives())
    assert {"contrastive_lse", "domain_fanout", "head_agreement_rows", "cosine_cross_entropy_rows",
            "assemble_tokens", "prefix_attention", "eot_head"} <= prims
    for p in prims:
        if p.startswith("_"):  # probes of other tests
            continue
        want = set(dgkernels.BACKENDS) - ({"reference"} if p.endswith("_backward") or p == "index_add_rows" else set())
        assert set(_dispatch.implemented(p)) == want, p  # the reference's backward is autograd


@pytest.mark.parametrize("prim,name", _registered())
def test_each_backend_is_a_declaration_implementing_the_primitive(prim, name):
    if prim.startswith("_"):
        pytest.skip("a probe op of another test")
    backend = _dispatch.impl_of(prim, name)
    assert isinstance(backend, _dispatch.Backend) and backend.name == name
    if name == "triton" and not _triton_importable():
        pytest.skip("the triton module needs triton")
    if name in ("cpp", "cuda") and not _extension.load()[0]:
        pytest.skip("dgkernels._C is not built")
    assert callable(backend.primitive(prim)), f"{backend.module} does not implement {prim}"
    for call in (call_facts("cuda", F32), call_facts("cpu", (F64, F32), D=3, K=5, head_dim=64)):
        assert all(isinstance(why, str) and why for why in backend.not_supported_reasons(prim, call))
    if name != "cpp":
        assert backend.not_supported_reasons(prim, call_facts("cuda", F32)) == [], f"{name} refuses float32 {prim}"


def test_register_requires_a_declaration():
    with pytest.raises(TypeError, match="Backend"):
        _dispatch.register(SimpleNamespace(name="cpp"), ("_probe_undeclared",))


def _reasons(prim, name, call):
    return "; ".join(_dispatch.impl_of(prim, name).not_supported_reasons(prim, call))


@needs_triton_import
def test_triton_declarations_give_their_reasons():
    assert "float64" in _reasons("contrastive_lse", "triton", call_facts("cuda", F64))
    for dt in (F32, torch.bfloat16, torch.float16):
        assert _reasons("contrastive_lse", "triton", call_facts("cuda", dt)) == ""
    assert "float64" in _reasons("domain_fanout", "triton", call_facts("cuda", F64))
    assert "D x K" in _reasons("head_agreement_rows", "triton", call_facts("cuda", F32, D=64, K=1000))
    assert _reasons("head_agreement_rows", "triton", call_facts("cuda", F32, D=4, K=1000)) == ""  # the limit
    assert _reasons("domain_fanout", "triton", call_facts("cuda", F32, D=64, K=1000)) == ""  # no tile limit there
    # The prompt kernels look at both dtypes (activations, embeddings) and the attention's head size.
    assert "float64" in _reasons("assemble_tokens", "triton", call_facts("cuda", (F32, F64)))
    assert "head dims up to 128" in _reasons("prefix_attention", "triton", call_facts("cuda", F32, head_dim=160))
    assert _reasons("eot_head", "triton", call_facts("cuda", F32, head_dim=160)) == ""
    assert _reasons("prefix_attention", "triton", call_facts("cuda", F32, head_dim=128)) == ""
    # the device types follow from the backend's name
    assert "CPU tensors" in _reasons("domain_fanout", "cpp", call_facts("cuda", F32))
    assert "CUDA tensors" in _reasons("domain_fanout", "cuda", call_facts("cpu", F32))


def test_compiled_prompt_declaration():
    long = call_facts("cuda", F64, head_dim=64, prefix_len=5, suffix_len=200)
    assert "128 tokens" in _reasons("prefix_attention", "cuda", long)
    assert _reasons("eot_head", "cuda", long) == ""
    assert _reasons("prefix_attention", "cpp", call_facts("cpu", F64, prefix_len=5, suffix_len=200)) == ""
    assert _reasons("prefix_attention", "cuda", call_facts("cuda", F32, prefix_len=5, suffix_len=200)) == ""


# ---- what _dispatch decides from the declarations -------------------------------------------

@pytest.fixture
def probe(monkeypatch, all_available):
    """An op whose triton refuses float64 and whose cuda refuses K > 8 (reference runs everything)."""
    def backend(name, refusal):
        declared = _dispatch.Backend("_probe", name, "dgkernels.contrastive.reference", "a probe")  # device types

        def reasons(p, c):
            return declared.not_supported_reasons(p, c) + [r for r in [refusal(p, c)] if r]

        return SimpleNamespace(name=name, not_supported_reasons=reasons)

    impls = {"triton": backend("triton", lambda op, c: "no float64 here" if F64 in c.dtypes else ""),
             "cuda": backend("cuda", lambda op, c: "K too large" if (c.size("K") or 0) > 8 else ""),
             "cpp": backend("cpp", lambda op, c: ""),
             "reference": backend("reference", lambda op, c: "")}
    monkeypatch.setitem(_dispatch._REGISTRY, "_probe_support", impls)
    return impls


def test_automatic_selection_falls_through_refusals(probe):
    pick = lambda call: _dispatch.select("_probe_support", CUDA, None, call)[0]  # noqa: E731
    assert pick(call_facts("cuda", F32)) == "triton"
    assert pick(call_facts("cuda", F64)) == "cuda"
    assert pick(call_facts("cuda", F64, K=9)) == "reference"
    assert pick(None) == "triton"  # facts not stated: the device alone
    assert _dispatch.select("_probe_support", CUDA, None, call_facts("cuda", F64))[1] is probe["cuda"]


def test_explicit_request_a_backend_refuses_raises_its_reason(probe, monkeypatch):
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable: no float64 here"):
        _dispatch.select("_probe_support", CUDA, "triton", call_facts("cuda", F64))
    monkeypatch.setenv("DGKERNELS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="K too large"):
        _dispatch.select("_probe_support", CUDA, None, call_facts("cuda", F32, K=9))
    assert _dispatch.select("_probe_support", CUDA, None, call_facts("cuda", F64))[0] == "cuda"


def test_select_all_picks_one_backend_every_op_accepts(probe, monkeypatch):
    other = dict(probe, triton=SimpleNamespace(not_supported_reasons=lambda p, c: ["not this op"]))
    monkeypatch.setitem(_dispatch._REGISTRY, "_probe_support2", other)
    name, impls = _dispatch.select_all(("_probe_support", "_probe_support2"), CUDA, None, call_facts("cuda", F32))
    assert name == "cuda" and impls == (probe["cuda"], other["cuda"])
    with pytest.raises(BackendUnavailableError, match="not this op"):
        _dispatch.select_all(("_probe_support", "_probe_support2"), CUDA, "triton", call_facts("cuda", F32))


def test_select_name_matches_select(probe):
    for call in (call_facts("cuda", F32), call_facts("cuda", F64), call_facts("cuda", F64, K=9)):
        assert _dispatch.select_name("_probe_support", CUDA, None, call) == _dispatch.select("_probe_support", CUDA,
                                                                                                 None, call)[0]


def test_facts_must_describe_the_call_device(probe):
    with pytest.raises(ValueError, match="call facts are for cpu"):
        _dispatch.select("_probe_support", CUDA, None, call_facts("cpu", F32))


def test_call_facts_are_hashable_and_checked():
    a = call_facts("cuda:0", [F32, torch.bfloat16, F32], K=3, D=2)
    assert a == CallFacts("cuda", (F32, torch.bfloat16), (("D", 2), ("K", 3)))
    assert hash(a) == hash(call_facts(torch.device("cuda"), (F32, torch.bfloat16), D=2, K=3))
    assert a.size("K") == 3 and a.size("E") is None and a.unsupported_dtype({F32}) == torch.bfloat16
    with pytest.raises(TypeError, match="int"):
        call_facts("cpu", F32, K=3.0)
    with pytest.raises(TypeError, match="dtype"):
        call_facts("cpu", "float32")


def test_explain_reports_every_backend_for_the_facts(probe):
    why = dgkernels.explain("_probe_support", "cuda", dtype=F64, K=9)
    assert why == {"triton": "no float64 here", "cuda": "K too large",
                   "cpp": "the cpp backend runs CPU tensors, got cuda tensors", "reference": ""}
    assert dgkernels.explain("_probe_support", "cuda")["triton"] == ""  # the old signature: device only


def test_sizes_are_trace_time_constants_under_compile():
    # head_agreement's D and K reach the selection; with a second weight shape torch.compile
    # traces them as symbolic sizes, which call_facts turns into the constants the selection needs.
    fn = torch.compile(lambda x, w: dgkernels.head_agreement(x, w, backend="reference"), fullgraph=True,
                       backend="aot_eager")
    for d, k in ((3, 5), (4, 6), (5, 7)):
        x, w = torch.randn(6, 8), torch.randn(d, k, 8)
        torch.testing.assert_close(fn(x, w), dgkernels.head_agreement(x, w, backend="reference"))


# ---- the real op families, as dispatch sees them on a CUDA machine --------------------------

@needs_triton_import
def test_real_families_fall_through_on_cuda(all_available):
    # float64: triton refuses, the compiled CUDA kernels take it (no hand-off inside a backend)
    for op in ("contrastive_lse", "domain_fanout", "cosine_cross_entropy_rows"):
        assert _dispatch.select(op, CUDA, None, call_facts("cuda", F64))[0] == "cuda", op
        assert _dispatch.select(op, CUDA, None, call_facts("cuda", F32))[0] == "triton", op
    big = call_facts("cuda", F32, D=64, K=1000)
    assert _dispatch.select("head_agreement_rows", CUDA, None, big)[0] == "cuda"
    with pytest.raises(BackendUnavailableError, match="D x K"):
        _dispatch.select("head_agreement_rows", CUDA, "triton", big)
    prompt_ops = ("assemble_tokens", "prefix_attention", "eot_head")
    wide = call_facts("cuda", F32, head_dim=256)
    assert _dispatch.select_all(prompt_ops, CUDA, None, wide)[0] == "cuda"  # one backend for all three
    long64 = call_facts("cuda", F64, head_dim=64, prefix_len=5, suffix_len=300)
    assert _dispatch.select_all(prompt_ops, CUDA, None, long64)[0] == "reference"
    why = dgkernels.explain("head_agreement", "cuda", dtype=F32, D=64, K=1000)
    assert "D x K" in why["triton"] and why["cuda"] == "" and why["reference"] == ""


def _triton_runs(device):
    if dgkernels.explain("clip_loss", device)["triton"]:
        pytest.skip(dgkernels.explain("clip_loss", device)["triton"])


def test_public_ops_state_their_dtype_to_dispatch(triton_device):
    # A refused dtype is a BackendUnavailableError from _dispatch before any kernel launch (before:
    # a TypeError from the launcher, or a hand-off to the cuda kernels inside the triton backend).
    _triton_runs(triton_device)
    x, y = (torch.randn(5, 8, dtype=F64, device=triton_device) for _ in range(2))
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable: the triton contrastive kernels.*float64"):
        dgkernels.clip_loss(x, y, 2.0, backend="triton")


def test_prompt_calls_state_activation_and_embedding_dtypes(triton_device):
    _triton_runs(triton_device)
    pytest.importorskip("open_clip")
    import prompt_models

    twin = prompt_models.fp64_twin("tiny").to(triton_device)  # float64 activations
    prefix, suffix = torch.randn(1, 2, 32, dtype=F64), torch.randn(3, 4, 32, dtype=F64)
    prefix, suffix = prefix.to(triton_device), suffix.to(triton_device)
    with pytest.raises(BackendUnavailableError, match="assemble_tokens.*: backend 'triton'.*float64"):
        dgkernels.encode_prompts(twin, prefix, suffix, [4, 1, 2], backend="triton")
    model = prompt_models.model("tiny").to(triton_device)  # float32 activations, float64 embeddings given
    with pytest.raises(BackendUnavailableError, match="float64"):
        dgkernels.encode_prompts(model, prefix, suffix, [4, 1, 2], backend="triton")
    out = dgkernels.encode_prompts(model, prefix.float(), suffix.float(), [4, 1, 2], backend="triton")
    assert out.shape[:2] == (1, 3) and out.dtype == torch.float32


# ---- the shape of the code ------------------------------------------------------------------

def _sources():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "_dispatch.py"]


def test_no_module_reaches_into_dispatch_internals():
    private = re.compile(r"_dispatch\s*\.\s*_[A-Za-z]|from\s+\S*_dispatch\s+import\s+[^\n]*\b_[A-Za-z]")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in _sources()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, f"private _dispatch names used outside it: {offenders}"


def test_backend_modules_do_not_dispatch_or_hand_off():
    # A backend says what it refuses; it never asks _dispatch or calls another backend.
    backends = [p for p in _sources()
                if p.stem in ("reference", "extension", "tiled_gemm", "triton") or p.parent.name == "triton"]
    assert len(backends) >= 9
    offenders = [str(p.relative_to(PACKAGE)) for p in backends
                 if re.search(r"\b_dispatch\b|from \. import (extension|tiled_gemm)|from \.(extension|tiled_gemm) import",
                              p.read_text())]
    assert not offenders, offenders
