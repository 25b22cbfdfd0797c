"""Every public dgkernels op under torch.compile(fullgraph=True): forward and backward trace
without a graph break, the graphs call the fused backend's custom ops (torch.ops.dgkernels.*, the
same ops eager calls) and match eager (values and gradients). The prompt encoders (encode_text,
encode_prompts, PromptEncoder) included: under compile they size their work on the host while
tracing (all L token positions; the packed layout at host-known lengths), so they match eager to
rounding.

The default compiler backend here is "aot_eager" (dynamo + AOTAutograd: the whole trace, fake
kernels, custom-op autograd; no code generation, so the module stays fast); the ops marked
INDUCTOR also go through inductor's C++ code generation on CPU (Triton on CUDA).
DGKERNELS_TEST_COMPILE_BACKEND=inductor runs every op through inductor.
"""
import copy
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


def _dgkernels_calls(fn, inputs):
    """The torch.ops.dgkernels ops in the forward and the backward graph of fn under fullgraph."""
    from torch._dynamo.backends.common import aot_autograd

    seen = {"forward": set(), "backward": set()}

    def capture(kind):
        def compiler(gm, example_inputs):
            seen[kind] |= {str(n.target).split(".")[1] for n in gm.graph.nodes
                           if n.op == "call_function" and str(n.target).startswith("dgkernels.")}
            return gm
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=capture("forward"),
                                                                      bw_compiler=capture("backward")))
    out = compiled(*inputs)
    (_prompt_loss(out) if out.dim() else out).backward()  # gradients of the inputs and any weights
    return seen


def _public_ops():
    return {n for n in dgkernels.__all__ if n[0].islower() and n not in ("backends", "explain", "use_backend")} | {
        "InfoNCE", "PromptEncoder"}


# public op -> the cases below (or in the prompt section) that compile it
COVERED = {"clip_loss": "clip_loss", "info_nce": "info_nce", "InfoNCE": "info_nce", "multiview_info_nce":
           "multiview_info_nce", "domain_fanout": "domain_fanout", "domain_cross_entropy": "domain_cross_entropy",
           "head_agreement": "head_agreement", "mapper_project": "mapper_project",
           "cosine_cross_entropy": "cosine_cross_entropy", "encode_text": "encode_text",
           "encode_prompts": "encode_prompts", "PromptEncoder": "PromptEncoder"}


def test_every_public_op_has_a_compile_case():
    assert _public_ops() == set(COVERED), "a public op without a compile case: add it to CASES and COVERED"


@pytest.mark.parametrize("case", list(CASES))
def test_graph_calls_the_custom_ops(case):
    if not dgkernels.backends()["cpp"]:
        pytest.skip("needs the compiled cpp backend; " + dgkernels.backends()["cpp"].reason)
    fn, build = CASES[case]
    calls = _dgkernels_calls(fn, build(torch.float32, "cpu"))
    # a reduced head loss runs its fused forward + backward op in the forward (dgkernels.heads.ops):
    # its backward graph only scales the gradients that op returned
    fused = any(c.endswith("_fused") for c in calls["forward"])
    assert calls["forward"] and (calls["backward"] or fused), calls
    from dgkernels import _primitives

    assert set.union(*calls.values()) <= set(_primitives.CUSTOM_OPS), \
        f"an extension kernel traced directly instead of a primitive's custom op: {calls}"


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


# ---------------------------------------------------------------------------------------------
# Prompt encoding: under compile a dense path of host-known length (see dgkernels.prompt.api)
# ---------------------------------------------------------------------------------------------
def _prompt_models():
    import prompt_models  # imports open_clip (skips the tests without it)

    return prompt_models


def _prompt_loss(feats):
    weights = torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)
    return (feats * weights).sum() + feats.square().sum()


def _values_and_grads(fn, wrt, *args):
    out = fn(*args)
    return [out.detach(), *torch.autograd.grad(_prompt_loss(out), wrt)]


def _assert_rel(got, want, tol):
    from dgkernels.testing import rel_error

    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = rel_error(a, b)
        assert err <= tol, f"output {i}: relative error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("backend", [None, "reference"])
def test_fullgraph_encode_text(backend):
    import copy

    from dgkernels.testing import EPS

    pm = _prompt_models()
    model = copy.deepcopy(pm.model("tiny")).requires_grad_(True)  # PromptEncoder freezes the shared one
    wrt = (model.text_projection, model.transformer.resblocks[0].mlp.c_fc.weight, model.positional_embedding)
    tokens = pm.random_tokens(5, [1, 4, 9, 3, 17], context=19)  # L = 19 < 77; the longest EOT at 17
    fn = lambda t: dgkernels.encode_text(model, t, normalize=True, backend=backend)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILER)
    want = _values_and_grads(fn, wrt, tokens)
    got = _values_and_grads(compiled, wrt, tokens)
    # The reference backend's eager arithmetic is the compiled path's (all L positions): equal to
    # the bit under aot_eager. The default backend truncates at 18 positions in eager: rounding.
    exact = backend == "reference" and COMPILER == "aot_eager"
    _assert_rel(got, want, 0.0 if exact else 64 * EPS[torch.float32])


@pytest.mark.parametrize("case", [
    dict(lengths=[6, 1, 3, 2], per_group=False, chunk_size=None, checkpoint=False, as_list=False),
    dict(lengths=[6, 1, 3, 2], per_group=False, chunk_size=3, checkpoint=True, as_list=True),
    dict(lengths=[2, 5, 1, 4], per_group=True, chunk_size=None, checkpoint=False, as_list=True),
])
def test_fullgraph_encode_prompts(case):
    from dgkernels.testing import EPS

    pm = _prompt_models()
    model = pm.model("tiny")
    g, k, lp, ls, w = 3, 4, 5, 7, 32  # the suffix tensor is wider than the longest length
    prefix = (torch.randn(g, lp, w) * 0.5).requires_grad_()
    suffix = (torch.randn(*((g,) if case["per_group"] else ()), k, ls, w) * 0.5).requires_grad_()
    lengths = case["lengths"] if case["as_list"] else torch.tensor(case["lengths"])
    kw = dict(chunk_size=case["chunk_size"], checkpoint=case["checkpoint"])
    fn = lambda p, s: dgkernels.encode_prompts(model, p, s, lengths, **kw)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILER)
    want = _values_and_grads(fn, (prefix, suffix), prefix, suffix)
    got = _values_and_grads(compiled, (prefix, suffix), prefix, suffix)
    # Eager: packed prefix-shared kernels; compiled: dense over Lp + longest (or Lp + Ls) positions.
    _assert_rel(got, want, 64 * EPS[torch.float32])


def test_fullgraph_encode_prompts_bf16_against_fp64():
    pm = _prompt_models()
    model, twin = pm.model("tiny", "bf16"), pm.fp64_twin("tiny", "bf16")
    prefix64, suffix64 = torch.randn(2, 4, 32, dtype=torch.float64) * 0.5, torch.randn(3, 5, 32, dtype=torch.float64) * 0.5
    lengths = torch.tensor([5, 2, 3])
    results = {}
    for name, mdl, dtype, comp in (("compiled", model, torch.bfloat16, True), ("eager", model, torch.bfloat16, False),
                                   ("exact", twin, torch.float64, False)):
        p, s = prefix64.to(dtype).requires_grad_(), suffix64.to(dtype).requires_grad_()
        fn = lambda p, s, mdl=mdl: dgkernels.encode_prompts(mdl, p, s, lengths)  # noqa: E731
        if comp:
            fn = torch.compile(fn, fullgraph=True, backend=COMPILER)
        results[name] = _values_and_grads(fn, (p, s), p, s)
    from dgkernels.testing import assert_close_to_fp64

    for i, what in enumerate(("features", "grad prefix", "grad suffix")):
        assert_close_to_fp64(results["compiled"][i], results["exact"][i], results["eager"][i], dtype=torch.bfloat16,
                             name=what)


@pytest.mark.parametrize("class_specific", [False, True])
def test_fullgraph_prompt_encoder(class_specific):
    from dgkernels.testing import EPS

    pm = _prompt_models()
    enc = dgkernels.PromptEncoder(pm.model("tiny"), ["dog", "alarm_clock", "a rather long class name here", "x"])
    ctx = enc.initial_context(n_ctx=3, classes=4 if class_specific else None).unsqueeze(0).repeat(2, *([1] * (3 if class_specific else 2)))
    ctx.requires_grad_()
    fn = lambda c: enc(c, class_specific=class_specific)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILER)
    want = _values_and_grads(fn, (ctx,), ctx)
    got = _values_and_grads(compiled, (ctx,), ctx)
    assert got[0].shape == (2, 4, 24)
    _assert_rel(got, want, 64 * EPS[torch.float32])


def test_compiled_prompt_checks():
    """Token / length values: host ValueErrors in eager (unchanged); under compile a device-side
    assert for tensor values, the eager error at trace time for lengths given as a list."""
    pm = _prompt_models()
    model = pm.model("tiny")
    tokens = pm.random_tokens(2, [3, 5], context=8)
    bad_tokens = tokens.clone()
    bad_tokens[0, 1] = 49408
    text = torch.compile(lambda t: dgkernels.encode_text(model, t), fullgraph=True, backend="aot_eager")
    assert torch.isfinite(text(tokens)).all()
    with pytest.raises(RuntimeError, match=r"tokens values must lie in \[0, 49408\)"):
        text(bad_tokens)
    prefix, suffix = torch.randn(1, 2, 32), torch.randn(3, 4, 32)
    prompts = torch.compile(lambda p, s, n: dgkernels.encode_prompts(model, p, s, n), fullgraph=True,
                            backend="aot_eager")
    assert torch.isfinite(prompts(prefix, suffix, torch.tensor([4, 1, 2]))).all()
    with pytest.raises(RuntimeError, match=r"suffix_lengths must lie in \[1, 4\]"):
        prompts(prefix, suffix, torch.tensor([4, 0, 2]))
    listed = torch.compile(lambda p, s: dgkernels.encode_prompts(model, p, s, [4, 5, 2]), fullgraph=True,
                           backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"suffix_lengths must lie in \[1, 4\]"):  # raised while tracing (dynamo wraps it)
        listed(prefix, suffix)
    if not dgkernels.backends()["triton"]:  # the backend is still resolved at trace time: a named one that cannot run refuses
        refused = torch.compile(lambda p, s: dgkernels.encode_prompts(model, p, s, [4, 1, 2], backend="triton"),
                                fullgraph=True, backend="aot_eager")
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
            refused(prefix, suffix)
    # the context-length bound: Lp + longest <= 77
    long_prefix, wide = torch.randn(1, 75, 32), torch.randn(3, 4, 32)
    with pytest.raises(RuntimeError, match="exceeds the model's context length 77"):
        prompts(long_prefix, wide, torch.tensor([1, 3, 2]))


def test_prompt_graphs_call_the_custom_ops():
    if not dgkernels.backends()["cpp"]:
        pytest.skip("needs the compiled cpp backend; " + dgkernels.backends()["cpp"].reason)
    pm = _prompt_models()
    model = pm.model("tiny")
    prefix, suffix = torch.randn(2, 3, 32).requires_grad_(), torch.randn(3, 4, 32).requires_grad_()
    for lengths in ([4, 1, 2], torch.tensor([4, 1, 2])):
        calls = _dgkernels_calls(lambda p, s, n=lengths: dgkernels.encode_prompts(model, p, s, n), (prefix, suffix))
        assert {"assemble_tokens", "prefix_attention", "eot_head"} <= calls["forward"], calls
        assert {"index_add_rows", "prefix_attention_backward", "eot_head_backward"} <= calls["backward"], calls
    enc = dgkernels.PromptEncoder(pm.model("tiny"), ["dog", "alarm_clock"])
    ctx = enc.initial_context(n_ctx=2).requires_grad_()
    assert "prefix_attention" in _dgkernels_calls(enc, (ctx,))["forward"]
    text_model = copy.deepcopy(pm.model("tiny")).requires_grad_(True)
    tokens = pm.random_tokens(3, [1, 4, 6], context=8)
    calls = _dgkernels_calls(lambda t: dgkernels.encode_text(text_model, t, normalize=True), (tokens,))
    assert {"assemble_tokens", "eot_head"} <= calls["forward"] and "eot_head_backward" in calls["backward"], calls


def test_fullgraph_encode_prompts_triton_backend(triton_device):
    if not dgkernels.backends()["triton"]:
        pytest.skip(dgkernels.backends()["triton"].reason)
    pm = _prompt_models()
    model = pm.model("tiny").to(triton_device)
    prefix = (torch.randn(2, 3, 32, device=triton_device) * 0.5).requires_grad_()
    suffix = (torch.randn(3, 5, 32, device=triton_device) * 0.5).requires_grad_()
    fn = lambda p, s: dgkernels.encode_prompts(model, p, s, [5, 2, 3], backend="triton")  # noqa: E731
    want = _values_and_grads(fn, (prefix, suffix), prefix, suffix)
    got = _values_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), (prefix, suffix), prefix, suffix)
    _assert_rel(got, want, 0.0)  # the same kernels on the same layout: equal to the bit
