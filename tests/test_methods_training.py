"""DALSCLIP, GOPro and SeeCLIP on a tiny random-weight CLIP: losses against direct formulas,
training steps that lower the loss, gradients only into trainable parameters, a frozen backbone
(bit for bit), and predictions that never read labels."""
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dgkernels

pytestmark = pytest.mark.skipif(
    not all(hasattr(dgkernels, op) for op in ("PromptEncoder", "cosine_cross_entropy", "multiview_info_nce",
                                               "domain_cross_entropy", "head_agreement", "mapper_project")),
    reason="needs the dgkernels prompt, heads and contrastive ops (pending merge of main)")

CLASSES = ["zero", "one", "two", "three", "four"]
B = 6


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from dgclip.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny-digits", "none", cache_dir=tmp_path_factory.mktemp("cache"))


def _hash(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _batch(views=False, seed=0):
    from dgclip.methods.base import Batch

    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    domains = torch.tensor([0, 0, 1, 1, 0, 1])
    if views:
        imgs = {k: _images(B, seed=seed + i) for i, k in enumerate(("original", "moco", "augmix"))}
    else:
        imgs = _images(B, seed=seed)
    return Batch(images=imgs, labels=labels, domains=domains)


def _make(name, backbone, **hp):
    from dgclip.methods import get_method

    cls = get_method(name)
    m = cls(backbone, CLASSES, 2, hp)
    m.configure_optimizers(100)
    return m


def _train(method, batch, steps):
    return [method.update(batch)["loss"] for _ in range(steps)]


def _check_grads_and_frozen(method, backbone, batch):
    before = _hash(backbone.model)
    method.train()
    method.optimizer.zero_grad(set_to_none=True)
    out = method.losses(*method_inputs(method, batch))
    out["loss"].backward()
    frozen = {id(p) for p in backbone.model.parameters()}
    assert all(p.grad is None for p in backbone.model.parameters())
    trainable = [p for p in method.parameters() if id(p) not in frozen]
    assert trainable and all(p.requires_grad for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    method.optimizer.zero_grad(set_to_none=True)
    assert _hash(backbone.model) == before


def method_inputs(method, batch):
    name = method.name
    batch = batch.to(method.backbone.device)
    if name == "gopro":
        return batch.images, batch.labels
    if name == "seeclip":
        return method.training_inputs(batch)
    return method.batch_features(batch).pooled, batch.labels, batch.domains


# ---------------------------------------------------------------------------------------------
# GOPro
def test_gopro_losses_match_formulas(backbone):
    m = _make("gopro", backbone)
    m.train()
    batch = _batch(views=True)
    out = m.losses(batch.images, batch.labels)
    feats = backbone.image_features(torch.cat([batch.images[v] for v in ("original", "moco", "augmix")]), layer_stats=True)
    # direct per-image prompts: ctx + shift, encoded for one image at a time
    text = torch.stack([m.encoder(m.ctx + m.shift(feats.layer_mean[i:i + 1], feats.layer_std[i:i + 1])[0]) [0]
                        for i in range(3 * B)]).view(3, B, len(CLASSES), -1)
    pooled = feats.pooled.view(3, B, -1)
    # released code: P_v = Linear + BatchNorm1d applied to the L2-normalised image feature
    p_o, p_m = m.projector(F.normalize(pooled[0], dim=-1)), m.projector(F.normalize(pooled[1], dim=-1))
    # released code: the RAW image feature feeds the logits, P_v only the SimCLR term
    logits = backbone.logit_scale * F.normalize(pooled[0], dim=-1)[:, None, :].mul(F.normalize(text[0], dim=-1)).sum(-1)
    ce = F.cross_entropy(logits, batch.labels)
    t = F.normalize(text, dim=-1)
    cons = ((t[0] - t[1]) ** 2).mean() + ((t[0] - t[2]) ** 2).mean()
    z = F.normalize(torch.cat([p_o, p_m]), dim=-1)
    sim = z @ z.t() / 0.1
    sim.fill_diagonal_(float("-inf"))
    pos = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    nce = F.cross_entropy(sim, pos)
    torch.testing.assert_close(out["ce"], ce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["consistency"], cons, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["contrastive"], nce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["loss"], ce + cons + 0.1 * nce, atol=1e-4, rtol=1e-4)


def test_gopro_projector_sees_the_normalised_feature_by_default(backbone):
    """Released GOPro divides the image feature by its norm before self.simproj; the raw pooled
    feature is the named option projector_raw_input. The backbone's pooled features are far from
    unit norm, so P_v's output (and the SimCLR term) tell the two inputs apart."""
    batch = _batch(views=True)
    feats = backbone.image_features(torch.cat([batch.images[v] for v in ("original", "moco", "augmix")]),
                                    layer_stats=True)
    pooled = feats.pooled.view(3, B, -1)
    assert not torch.allclose(pooled[0].norm(dim=-1), torch.ones(B), atol=1e-2)  # the check can fail
    seen = []
    for raw in (False, True):
        m = _make("gopro", backbone, projector_raw_input=raw)
        m.train()
        m.projector[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
        out = m.losses(batch.images, batch.labels)
        want_in = [pooled[0], pooled[1]] if raw else [F.normalize(pooled[0], dim=-1), F.normalize(pooled[1], dim=-1)]
        got = seen[-2:]
        for g, w in zip(got, want_in):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        z = F.normalize(torch.cat([m.projector(w) for w in want_in]), dim=-1)
        sim = z @ z.t() / 0.1
        sim.fill_diagonal_(float("-inf"))
        pos = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
        torch.testing.assert_close(out["contrastive"], F.cross_entropy(sim, pos), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="projector_raw_input must be one of"):
        _make("gopro", backbone, projector_raw_input="yes")


def test_gopro_projector_option(backbone):
    batch = _batch(views=True)
    for feeds in (True, False):
        m = _make("gopro", backbone, projector_feeds_logits=feeds)
        m.eval()
        feats = backbone.image_features(batch.images["original"], layer_stats=True)
        image = m.projector(F.normalize(feats.pooled, dim=-1)) if feeds else feats.pooled
        want = backbone.logit_scale * torch.einsum("be,bke->bk", F.normalize(image, dim=-1),
                                                   F.normalize(m.text_features(feats), dim=-1))
        torch.testing.assert_close(m.predict(batch.images), want, atol=1e-4, rtol=1e-4)


def test_gopro_defaults_are_the_released_code(backbone):
    """Released GOPro: raw image feature in the logits, P_v = Linear + BatchNorm1d and the layer
    mix with PyTorch's default init, 4 images per step in total. The paper figure's reading (P_v in
    the logits) is an option that then starts P_v as the identity: zero-shot CLIP at step 0."""
    from dgclip.methods import get_method

    gopro = get_method("gopro")
    d = gopro.all_defaults()
    assert (d["projector_feeds_logits"], d["projector_init"], d["shift_init"]) == (False, "random", "default")
    assert d["projector_raw_input"] is False and "L389-390" in gopro.hparam_sources["projector_raw_input"]
    assert (d["batch_size"], d["batch_scope"]) == (4, "total")
    batch = _batch(views=True)
    feats = backbone.image_features(batch.images["original"], layer_stats=True)
    m = _make("gopro", backbone)
    assert m.shift.layer_mix.weight.abs().sum() > 0  # nn.Linear's init, not zeros
    assert not torch.allclose(m.project(feats.pooled), feats.pooled)  # P_v random: kept out of the logits
    zs = get_method("zero-shot")(backbone, CLASSES, 2, {})
    paper = _make("gopro", backbone, projector_feeds_logits=True, projector_init="zero_residual", shift_init="zero")
    paper.eval()
    torch.testing.assert_close(paper.project(feats.pooled), F.normalize(feats.pooled, dim=-1), atol=0, rtol=0)
    torch.testing.assert_close(paper.predict(batch.images), zs.predict(batch.images["original"]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="projector_init must be one of"):
        _make("gopro", backbone, projector_init="eye")
    with pytest.raises(ValueError, match="shift_init must be one of"):
        _make("gopro", backbone, shift_init="eye")


def test_gopro_trains_frozen_backbone(backbone):
    m = _make("gopro", backbone, lr=0.05)
    batch = _batch(views=True)
    _check_grads_and_frozen(m, backbone, batch)
    before = _hash(backbone.model)
    losses = _train(m, batch, 6)
    assert losses[-1] < losses[0]
    assert _hash(backbone.model) == before
    with pytest.raises(ValueError, match="views"):
        m.update(_batch(views=False))


# ---------------------------------------------------------------------------------------------
# SeeCLIP
def test_seeclip_losses_match_formulas(backbone):
    m = _make("seeclip", backbone, unknown_generator="none")
    batch = _batch()
    feats = backbone.image_features(batch.images, patches=True)
    labels = batch.labels.clone()
    labels[-1] = len(CLASSES)  # one sample playing a pseudo-unknown
    out = m.losses(feats.pooled, feats.patches, labels)
    # direct: tokens, domain token, prompts per image
    alpha = torch.softmax(torch.einsum("bpe,ke->bkp", feats.patches, m.tokenizer.queries), -1)
    v = torch.einsum("bkp,bpe->bke", alpha, feats.patches)
    dom = feats.patches.mean(1) @ m.phi.weight.t() + m.phi.bias
    psi = torch.stack([v[:, k] @ m.psi.weight[k] + m.psi.bias[k] for k in range(v.shape[1])], 1)
    known = m.known_encoder(torch.cat([dom[:, None], psi], 1))
    unk = m.unknown_encoder(torch.cat([dom[:, None], m.unknown_ctx.expand(B, -1, -1)], 1))[:, 0]
    text = F.normalize(torch.cat([known, unk[:, None]], 1), dim=-1)
    logits = backbone.logit_scale * torch.einsum("be,bke->bk", F.normalize(feats.pooled, dim=-1), text)
    ali = F.cross_entropy(logits, labels)
    cos = torch.einsum("be,bke->bk", F.normalize(unk, dim=-1), F.normalize(known, dim=-1))
    rep = (cos - 0.5).clamp_min(0).mean()
    # L_coh as released: MSE(mean_b u_b, mean_b t_{b, y_b}) over the known samples
    kn = labels < len(CLASSES)
    own = F.normalize(known, dim=-1)[kn.nonzero()[:, 0], labels[kn]]
    coh = ((F.normalize(unk[kn], dim=-1).mean(0) - own.mean(0)) ** 2).mean()
    reg = m.psi.weight.abs().sum()
    torch.testing.assert_close(out["ali"], ali, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["rep"], rep, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["coh"], coh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["reg"], reg)
    # effective L_reg weight 1e-4: lambda 0.01 (Eq. 7) inside gamma 0.01 (Eq. 11)
    torch.testing.assert_close(out["loss"], ali + rep + 0.5 * coh + 1e-4 * reg, atol=1e-4, rtol=1e-4)
    image_coh = _make("seeclip", backbone, unknown_generator="none", coh_centroid="image")
    image_coh.load_state_dict(m.state_dict())
    want = ((F.normalize(unk, dim=-1) - F.normalize(known, dim=-1).mean(1)) ** 2).mean()
    torch.testing.assert_close(image_coh.losses(feats.pooled, feats.patches, labels)["coh"], want, atol=1e-5, rtol=1e-4)
    batch_coh = _make("seeclip", backbone, unknown_generator="none", coh_centroid="batch")
    batch_coh.load_state_dict(m.state_dict())
    want = ((F.normalize(unk, dim=-1) - F.normalize(known, dim=-1).mean((0, 1))) ** 2).mean()
    torch.testing.assert_close(batch_coh.losses(feats.pooled, feats.patches, labels)["coh"], want, atol=1e-5, rtol=1e-4)
    assert m.predict(batch.images).shape == (B, len(CLASSES) + 1)


def test_seeclip_pseudo_unknowns_join_the_batch(backbone):
    # paper: max(1, int(ratio * B)) PER SOURCE DOMAIN per step, B = the whole batch (6 here, 3 per
    # domain, 2 domains), capped at the domain's images in the batch
    for ratio, n in ((0.1, 2), (0.2, 2), (0.34, 4), (0.5, 6), (0.7, 6)):
        m = _make("seeclip", backbone, unknown_ratio=ratio)
        pooled, patches, labels = m.training_inputs(_batch(), generator=torch.Generator().manual_seed(0))
        assert pooled.shape[0] == patches.shape[0] == labels.shape[0] == B + n, ratio
        assert (labels[B:] == len(CLASSES)).all() and (labels[:B] < len(CLASSES)).all()


def test_seeclip_pixel_composite_unknowns(backbone):
    """Composites of two known images of different classes (same domain), in pixel space,
    encoded by the frozen tower; SeeCLIP then needs images (no feature cache)."""
    from dgclip.methods.pseudo_unknown import PixelCompositeUnknowns, UnknownRequest

    m = _make("seeclip", backbone, unknown_generator="pixel_composite", unknown_ratio=0.5)
    assert not m.uses_frozen_features and isinstance(m.generator, PixelCompositeUnknowns)
    pooled, patches, labels = m.training_inputs(_batch(), generator=torch.Generator().manual_seed(0))
    assert pooled.shape[0] == B + 6 and (labels[B:] == len(CLASSES)).all()
    a, b = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    out = PixelCompositeUnknowns.compose(a, b, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out[0], torch.maximum(a[0], b[0]))
    torch.testing.assert_close(out[1, :, :4], a[1, :, :4]) and torch.testing.assert_close(out[1, :, 4:], b[1, :, 4:])
    torch.testing.assert_close(out[2, :, :, :4], a[2, :, :, :4])
    torch.testing.assert_close(out[2, :, :, 4:], b[2, :, :, 4:])
    seen = {}
    gen = PixelCompositeUnknowns(lambda x: (seen.setdefault("x", x).mean((2, 3)), x.flatten(2).transpose(1, 2)), 0.5)
    imgs = torch.rand(6, 3, 8, 8)
    res = gen(UnknownRequest(torch.zeros(6, 3), torch.zeros(6, 64, 3), torch.tensor([0, 1, 2, 3, 4, 1]),
                             torch.tensor([0, 0, 1, 1, 0, 1]), imgs), generator=torch.Generator().manual_seed(1))
    assert seen["x"].shape == (6, 3, 8, 8) and sorted(res.domains.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="images"):
        gen(UnknownRequest(torch.zeros(6, 3), torch.zeros(6, 64, 3), torch.zeros(6, dtype=torch.long),
                           torch.zeros(6, dtype=torch.long)))


def test_seeclip_trains_frozen_backbone(backbone):
    m = _make("seeclip", backbone, reg_reduction="mean")
    batch = _batch()
    _check_grads_and_frozen(m, backbone, batch)
    torch.manual_seed(0)
    losses = _train(m, batch, 6)
    assert losses[-1] < losses[0]


def test_seeclip_predictions_ignore_labels(backbone):
    """No label reaches the model at test time: shuffled evaluation labels, same predictions."""
    m = _make("seeclip", backbone)
    _train(m, _batch(), 2)
    images = _images(8, seed=5)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 0])
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    from dgclip.methods.base import Batch

    a = m.predict(Batch(images=images, labels=labels, domains=torch.zeros(8, dtype=torch.long)).original())
    b = m.predict(Batch(images=images, labels=labels[perm], domains=torch.zeros(8, dtype=torch.long)).original())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and a prediction does not depend on the other images of the batch
    torch.testing.assert_close(m.predict(images[:3]), a[:3], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# DALSCLIP
def test_dalsclip_schedule_and_losses(backbone):
    # the first reading of the abstract, still available through options
    m = _make("dalsclip", backbone, head_fraction=0.2, removal="learned", prompt_residual=False, n_ctx=16, ctx_init="", generator_attention="batch", train_context="domain", test_context="instance", head_logit_weight=0.0, schedule="two_stage", lr=2e-3, head_lr_mult=10.0)  # 100 steps: 20 head steps
    batch = _batch()
    pooled = backbone.image_features(batch.images).pooled
    assert m.stage() == "heads"
    out = m.losses(pooled, batch.labels, batch.domains)
    x = F.normalize(pooled, dim=-1) * pooled.shape[-1] ** 0.5
    logits = torch.einsum("be,bke->bk", x, m.head_weight[batch.domains]) + m.head_bias[batch.domains]
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch.labels))
    m.steps_done.fill_(20)
    assert m.stage() == "mapping"
    with torch.no_grad():
        m.head_weight.normal_()
        m.map_weight.normal_(std=0.05)
    m.eval()  # no dropout, to compare with the direct computation
    out = m.losses(pooled, batch.labels, batch.domains)
    f_map = F.normalize(pooled - pooled @ m.map_weight.t() - m.map_bias, dim=-1)
    ctx = m.prompt_generator(F.normalize(pooled, dim=-1), batch.domains, pool=True, num_groups=2)
    text = m.encoder(ctx)[batch.domains]
    logits = backbone.logit_scale * torch.einsum("be,bke->bk", f_map, F.normalize(text, dim=-1))
    ce = F.cross_entropy(logits, batch.labels)
    probs = torch.softmax(torch.einsum("be,dke->bdk", f_map * pooled.shape[-1] ** 0.5, m.head_weight) + m.head_bias, -1)
    mean = probs.mean(1, keepdim=True)
    agree = (probs * (probs.log() - mean.log())).sum(-1).mean()
    stay = ((f_map - F.normalize(pooled, dim=-1)) ** 2).sum(-1).mean()
    torch.testing.assert_close(out["ce"], ce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["agreement"], agree, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["stay"], stay, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["loss"], ce + agree + 0.1 * stay, atol=1e-4, rtol=1e-4)


def test_dalsclip_trains_in_both_stages_on_cached_features(backbone):
    from dgclip.methods.base import Batch

    m = _make("dalsclip", backbone, head_fraction=0.05, removal="learned", prompt_residual=False, n_ctx=16, ctx_init="", generator_attention="batch", train_context="domain", test_context="instance", head_logit_weight=0.0, schedule="two_stage", lr=2e-3, head_lr_mult=10.0)  # 5 head steps of 100
    batch = _batch()
    cached = Batch(images=None, labels=batch.labels, domains=batch.domains, features=backbone.image_features(batch.images))
    heads = _train(m, cached, 5)
    assert heads[-1] < heads[0] and m.stage() == "mapping"
    head_w = m.head_weight.detach().clone()
    _check_grads_and_frozen(m, backbone, cached)
    mapping = _train(m, cached, 6)
    assert mapping[-1] < mapping[0]
    torch.testing.assert_close(m.head_weight, head_w, rtol=0, atol=0)  # heads frozen in stage 2
    m.eval()  # the engine sets the mode (dropout off for prediction)
    logits = m.predict(batch.images)
    assert logits.shape == (B, len(CLASSES))
    torch.testing.assert_close(m.predict(batch.images[:2]), logits[:2], atol=1e-5, rtol=1e-5)


def test_dalsclip_defaults_start_from_zero_shot_with_every_step_on(backbone):
    """Default DALSCLIP: every step of the abstract on (per-domain heads, a LEARNED removal mapping,
    the heads aggregated into the prediction, attention over several tokens per image); residual
    prompts on "a photo of a" so the first predictions are zero-shot CLIP's (per image)."""
    from dgclip.methods import get_method
    from dgclip.methods.prompt_modules import TokenAttentionPromptGenerator

    m = _make("dalsclip", backbone)
    hp = m.hparams
    assert (hp["removal"], hp["generator_attention"], hp["schedule"]) == ("learned", "tokens", "joint")
    assert hp["head_logit_weight"] > 0 and isinstance(m.prompt_generator, TokenAttentionPromptGenerator)
    batch = _batch()
    zs = get_method("zero-shot")(backbone, CLASSES, 2, {})
    pooled = backbone.image_features(batch.images).pooled
    m.eval()
    # heads and mapping at zero: f' = f, uniform head term -> zero-shot log-probs + const
    want = F.log_softmax(zs.predict(batch.images), -1) + F.log_softmax(torch.zeros(B, len(CLASSES)), -1)
    torch.testing.assert_close(m.predict(batch.images), want, atol=1e-4, rtol=1e-4)
    m.train()
    out = m.losses(pooled, batch.labels, batch.domains)
    assert set(out) == {"loss", "ce", "heads", "agreement", "stay"}
    _check_grads_and_frozen(m, backbone, batch)
    assert not m.transductive
    assert _make("dalsclip", backbone, generator_attention="batch", test_context="batch").transductive


def test_dalsclip_head_directions_option(backbone):
    m = _make("dalsclip", backbone, removal="head_directions")
    pooled = backbone.image_features(_batch().images).pooled
    with torch.no_grad():
        m.head_weight.normal_()
    u = m.removal_basis()
    assert u.shape == (pooled.shape[-1], 2)
    dev = (m.head_weight - m.head_weight.mean(0)).reshape(-1, pooled.shape[-1])
    torch.testing.assert_close(m.mapped(pooled) @ u, torch.zeros(B, 2), atol=1e-5, rtol=0)
    s_all = torch.linalg.svdvals(dev)
    torch.testing.assert_close((dev @ u).norm(dim=0), s_all[:2], atol=1e-4, rtol=1e-4)


def test_dalsclip_attention_is_not_an_mlp(backbone):
    """The attention attends over more than one token: with the image feature fixed, the domain
    heads (other tokens) change the generated prompt, the attention weights spread over several
    tokens, and the output differs from the same module with the attention reduced to the image
    token alone (what a one-token "attention" is: an MLP of f)."""
    torch.manual_seed(0)
    m = _make("dalsclip", backbone)
    m.eval()
    with torch.no_grad():
        m.head_weight.normal_()
        m.map_weight.normal_(std=0.05)
        for p in m.prompt_generator.parameters():
            p.normal_(std=0.2)
    pooled = backbone.image_features(_batch().images).pooled
    gen = m.prompt_generator
    tokens = m.generator_tokens(pooled, m.mapped(pooled))
    assert tokens.shape[1] == m.num_domains + 2
    attended, weights = gen.attention(tokens)
    assert (weights.max(-1).values < 0.99).all() and ((weights > 0.01).sum(-1) >= 2).all()
    out = gen(tokens)
    # attention over the image token only: softmax of one score is 1, the value is v(f): an MLP of f
    h_mlp = tokens[:, 0] + gen.out(gen.kv(gen.norm(tokens[:, :1]))[:, 0].chunk(2, dim=-1)[1])
    as_mlp = gen.mlp(h_mlp).view_as(out)
    assert (out - as_mlp).abs().max() > 1e-3
    with torch.no_grad():  # same image features, other domain heads: another prompt
        m.head_weight.normal_()
    assert (gen(m.generator_tokens(pooled, m.mapped(pooled))) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="T >= 2"):
        gen(tokens[:, :1])


def test_registry_and_search_spaces():
    from dgclip.methods import get_method

    for name in ("dalsclip", "gopro", "seeclip"):
        cls = get_method(name)
        assert cls.name == name
        hp = cls.hparams_for(3)
        assert set(hp) == set(cls.all_defaults())
        assert hp == cls.hparams_for(3) and hp != cls.all_defaults()
    assert get_method("seeclip").open_set and not get_method("gopro").open_set
    assert get_method("dalsclip").uses_frozen_features and not get_method("gopro").uses_frozen_features
