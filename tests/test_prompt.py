"""encode_text / encode_prompts / PromptEncoder against open_clip and the naive CoOp encoder."""
import copy

import pytest
import torch

import dgkernels
from dgkernels.prompt.reference import naive_encode_prompts
from dgkernels.testing import EPS, assert_close_to_fp64, rel_error

import prompt_models as pm

DTYPE_OF = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# encode_text == model.encode_text
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_encode_text_matches_open_clip_tiny(precision, custom_text, normalize):
    model = pm.model("tiny", precision, custom_text)
    twin = pm.fp64_twin("tiny", precision, custom_text)
    tokens = pm.random_tokens(6, [0, 1, 5, 9, 30, 76])
    with torch.no_grad():
        out = dgkernels.encode_text(model, tokens, normalize=normalize)
        base = model.encode_text(tokens, normalize=normalize)
        exact = twin.encode_text(tokens, normalize=normalize)
    assert out.dtype == base.dtype
    assert_close_to_fp64(out, exact, base, dtype=DTYPE_OF[precision], name="encode_text")


def test_encode_text_layer_scale_and_text_transformer():
    model = pm.model("tiny", "fp32", True, True)  # CustomTextCLIP with LayerScale
    tokens = pm.random_tokens(3, [4, 2, 11])
    with torch.no_grad():
        exact = pm.fp64_twin("tiny", "fp32", True, True).encode_text(tokens)
        assert_close_to_fp64(dgkernels.encode_text(model, tokens), exact, model.encode_text(tokens))
        # a bare TextTransformer works too
        assert_close_to_fp64(dgkernels.encode_text(model.text, tokens), exact, model.text(tokens))


def test_encode_text_gradients_reach_tower_weights():
    model = copy.deepcopy(pm.model("tiny")).requires_grad_(True)  # PromptEncoder freezes the shared one
    tokens = pm.random_tokens(4, [3, 7, 2, 12])
    proj = model.text_projection
    w = model.transformer.resblocks[0].mlp.c_fc.weight
    g_ref = torch.autograd.grad(model.encode_text(tokens, normalize=True).sum(), (proj, w))
    g_out = torch.autograd.grad(dgkernels.encode_text(model, tokens, normalize=True).sum(), (proj, w))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encode_text_matches_open_clip_vitb16(precision):
    model = pm.model("vitb16", precision)
    tokens = pm.random_tokens(2, [5, 17])
    with torch.no_grad():
        out = dgkernels.encode_text(model, tokens, normalize=True)
        base = model.encode_text(tokens, normalize=True)
        exact = pm.fp64_twin("vitb16", precision).encode_text(tokens, normalize=True)
    assert_close_to_fp64(out, exact, base, dtype=DTYPE_OF[precision], name="encode_text ViT-B-16")


# ---------------------------------------------------------------------------------------------
# encode_prompts == naive CoOp encoder
# ---------------------------------------------------------------------------------------------
def _prompt_inputs(g, k, lp, ls, lengths, per_group=False, width=32, dtype=torch.float32):
    prefix = torch.randn(g, lp, width, dtype=torch.float64) * 0.5
    suffix = torch.randn(*((g,) if per_group else ()), k, ls, width, dtype=torch.float64) * 0.5
    return prefix, suffix, torch.tensor(lengths)


def _loss(feats):
    weights = torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)
    return (feats * weights).sum() + feats.square().sum()


def _check_prompts(precision, prefix64, suffix64, lengths, normalize=True, **kw):
    """Values and gradients of encode_prompts vs the naive encoder (fp64 oracle, low-precision baseline)."""
    dtype = DTYPE_OF[precision]
    model, twin = pm.model("tiny", precision), pm.fp64_twin("tiny", precision)
    results = {}
    for name, fn, mdl, dt in (("out", dgkernels.encode_prompts, model, dtype),
                              ("base", naive_encode_prompts, model, dtype),
                              ("exact", naive_encode_prompts, twin, torch.float64)):
        p = prefix64.to(dt).requires_grad_()
        s = suffix64.to(dt).requires_grad_()
        feats = fn(mdl, p, s, lengths, normalize, **(kw if name == "out" else {}))
        gp, gs = torch.autograd.grad(_loss(feats), (p, s))
        results[name] = (feats, gp, gs)
    for i, what in enumerate(("features", "grad prefix", "grad suffix")):
        assert_close_to_fp64(results["out"][i], results["exact"][i], results["base"][i], dtype=dtype, name=what)
    return results["out"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", [
    dict(g=1, k=7, lp=17, ls=6, lengths=[1, 6, 3, 2, 5, 4, 6]),          # shared context (CoOp)
    dict(g=3, k=5, lp=5, ls=5, lengths=[3, 1, 5, 2, 4]),                  # G = B instance-conditioned
    dict(g=2, k=3, lp=5, ls=4, lengths=[4, 2, 3], per_group=True),        # per-group suffix
    dict(g=2, k=5, lp=1, ls=9, lengths=[9, 5, 7, 6, 8]),                  # class-specific context (Lp = 1)
])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_encode_prompts_matches_naive(precision, case, backend):
    prefix, suffix, lengths = _prompt_inputs(**case)
    feats, _, _ = _check_prompts(precision, prefix, suffix, lengths, backend=backend)
    assert feats.shape == (case["g"], case["k"], 24)
    assert torch.allclose(feats.float().norm(dim=-1), torch.ones(()), atol=1e-2)


def test_encode_prompts_unnormalized_and_max_context():
    # prefix + longest suffix exactly fills the 77-token context
    prefix, suffix, lengths = _prompt_inputs(g=1, k=3, lp=70, ls=7, lengths=[7, 1, 4])
    _check_prompts("fp32", prefix, suffix, lengths, normalize=False)


@pytest.mark.parametrize("backend", [None, "reference"])  # the reference chunks its full-context prompts
@pytest.mark.parametrize("chunk_size, checkpoint", [(1, False), (4, False), (4, True), (None, True), (100, True)])
def test_chunked_and_checkpointed_equal_plain(chunk_size, checkpoint, backend):
    model = pm.model("tiny")
    prefix, suffix, lengths = _prompt_inputs(g=3, k=5, lp=4, ls=6, lengths=[6, 1, 3, 2, 5])
    outs = []
    for kw in ({}, dict(chunk_size=chunk_size, checkpoint=checkpoint)):
        p, s = prefix.float().requires_grad_(), suffix.float().requires_grad_()
        feats = dgkernels.encode_prompts(model, p, s, lengths, backend=backend, **kw)
        outs.append((feats, *torch.autograd.grad(_loss(feats), (p, s))))
    for a, b in zip(*outs):  # the same arithmetic, only matmul shapes differ: float32 rounding
        assert rel_error(a, b) < 64 * EPS[torch.float32]


# ---------------------------------------------------------------------------------------------
# PromptEncoder
# ---------------------------------------------------------------------------------------------
CLASSES = ["dog", "alarm_clock", "a rather long class name here", "x"]


def _coop_naive(model, enc, ctx):
    """CoOp's own recipe: tokenise 'X X .. X classname.', swap in ctx, full 77-token forward."""
    m = ctx.shape[-2]
    tokens = enc.tokenize([" ".join(["X"] * m) + " " + c.replace("_", " ") + "." for c in CLASSES])
    emb = model.token_embedding(tokens).to(ctx.dtype)
    g = 1 if ctx.dim() == 2 else ctx.shape[0]
    ctx_k = ctx.expand(len(CLASSES), -1, -1) if ctx.dim() == 2 else ctx
    eot = tokens.argmax(-1)
    lengths = eot - m
    suffix = emb[:, 1 + m:]
    if ctx.dim() == 3 and ctx.shape[0] == len(CLASSES):  # class-specific
        return naive_encode_prompts(model, emb[:1, :1], torch.cat([ctx_k, suffix], 1), eot, True)
    return naive_encode_prompts(model, torch.cat([emb[:1, :1].expand(g, -1, -1), ctx.view(g, m, -1)], 1),
                                suffix[:, :int(lengths.max())], lengths, True)


def test_prompt_encoder_matches_coop_recipe():
    model = pm.model("tiny")
    enc = dgkernels.PromptEncoder(model, CLASSES)
    assert enc.num_classes == 4 and enc.width == 32
    ctx = enc.initial_context(n_ctx=16)
    assert ctx.shape == (16, 32)
    torch.testing.assert_close(enc(ctx), _coop_naive(model, enc, ctx), rtol=1e-5, atol=1e-6)
    ctx_g = torch.randn(3, 4, 32) * 0.1
    torch.testing.assert_close(enc(ctx_g), _coop_naive(model, enc, ctx_g), rtol=1e-5, atol=1e-6)
    ctx_k = enc.initial_context(phrase="a photo of a", classes=4)
    assert ctx_k.shape == (4, 4, 32)
    torch.testing.assert_close(enc(ctx_k, class_specific=True), _coop_naive(model, enc, ctx_k), rtol=1e-5, atol=1e-6)


def test_prompt_encoder_phrase_init_is_the_phrase_prompt():
    # ctx initialised from "a photo of a" reproduces encode_text("a photo of a {class}.")
    model = pm.model("tiny")
    enc = dgkernels.PromptEncoder(model, CLASSES)
    ctx = enc.initial_context(phrase="a photo of a")
    tokens = enc.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(enc(ctx)[0], model.encode_text(tokens, normalize=True), rtol=1e-5, atol=1e-6)


def test_prompt_encoder_frozen_and_bf16():
    model = pm.model("tiny", custom_text=True)
    enc = dgkernels.PromptEncoder(model, CLASSES, dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in enc.parameters())
    ctx = torch.nn.Parameter(enc.initial_context(n_ctx=4))
    feats = enc(ctx)
    assert feats.dtype == torch.bfloat16 and feats.shape == (1, 4, 24)
    feats.float().sum().backward()
    assert ctx.grad is not None and torch.isfinite(ctx.grad).all()
    fp32 = dgkernels.PromptEncoder(model, CLASSES)(ctx.detach())
    assert (feats.float() - fp32).abs().max() < 0.05
    # the model's own weights stay float32
    assert model.text.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = pm.model("tiny")
    p = torch.randn(1, 3, 32)
    s = torch.randn(4, 5, 32)
    lens = torch.tensor([5, 1, 2, 3])
    enc = dgkernels.encode_prompts
    with pytest.raises(ValueError, match="width"):
        enc(model, torch.randn(1, 3, 16), s, lens)
    with pytest.raises(ValueError, match="width"):
        enc(model, p, torch.randn(4, 5, 16), lens)
    with pytest.raises(ValueError, match="context length"):
        enc(model, torch.randn(1, 74, 32), s, lens)
    with pytest.raises(ValueError, match="suffix_lengths"):
        enc(model, p, s, torch.tensor([6, 1, 2, 3]))
    with pytest.raises(ValueError, match="suffix_lengths"):
        enc(model, p, s, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="suffix_lengths"):
        enc(model, p, s, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="K >= 1"):
        enc(model, p, torch.randn(0, 5, 32), torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="dtype|float"):
        enc(model, p.double(), s, lens)
    with pytest.raises(TypeError, match="integer"):
        enc(model, p, s, lens.float())
    with pytest.raises(TypeError, match="floating"):
        enc(model, p.long(), s.long(), lens)
    with pytest.raises(ValueError, match="groups"):
        enc(model, p, torch.randn(2, 4, 5, 32), lens)
    with pytest.raises(ValueError, match="dimensions"):
        enc(model, p[0], s, lens)
    with pytest.raises(ValueError, match="chunk_size"):
        enc(model, p, s, lens, chunk_size=0)
    with pytest.raises(ValueError, match="device|meta"):
        enc(model, p.to("meta"), s.to("meta"), lens)
    with pytest.raises(TypeError, match="open_clip"):
        enc(torch.nn.Linear(2, 2), p, s, lens)
    tok = pm.random_tokens(2, [3, 4])
    with pytest.raises(TypeError, match="integer"):
        dgkernels.encode_text(model, tok.float())
    with pytest.raises(ValueError, match="context length"):
        dgkernels.encode_text(model, torch.cat([tok, tok], 1))
    with pytest.raises(ValueError, match="values"):
        dgkernels.encode_text(model, tok + 49408)
    with pytest.raises(ValueError, match="N >= 1"):
        dgkernels.encode_text(model, tok[:0])
    with pytest.raises(ValueError, match="K = 4"):
        dgkernels.PromptEncoder(model, CLASSES)(torch.randn(3, 2, 32), class_specific=True)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_float64_end_to_end_and_gradcheck(backend):
    if dgkernels.explain("prompt_prefix_attention")[backend]:
        pytest.skip(dgkernels.explain("prompt_prefix_attention")[backend])
    twin = pm.fp64_twin("tiny")
    prefix, suffix, lengths = _prompt_inputs(g=2, k=3, lp=3, ls=4, lengths=[4, 1, 2])
    out = dgkernels.encode_prompts(twin, prefix, suffix, lengths, backend=backend)
    assert rel_error(out, naive_encode_prompts(twin, prefix, suffix, lengths)) < 1e-12
    p = prefix[:1, :2].clone().requires_grad_()
    s = suffix[:2, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: dgkernels.encode_prompts(twin, a, b, torch.tensor([2, 1]), backend=backend), (p, s))
