import numpy as np
import pytest
import torch

from dgclip.methods import Batch, Method, UnknownMethodError, get_method, list_methods, register_method
from tests.dgclip_fixtures import backbone, cache_dir  # noqa: F401

NAMES = ["zero", "one", "two", "three"]


def _batch(n=16, domains=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g),
                 torch.arange(n) % domains)


def test_registry():
    assert {"zero-shot", "coop", "cocoop", "dpl"} <= set(list_methods())
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(TypeError):
        register_method("x")(object)
    cls = get_method("coop")
    assert cls.name == "coop" and issubclass(cls, Method)
    assert cls.hparams_for(0) == cls.all_defaults()
    a, b = cls.hparams_for(3), cls.hparams_for(3)
    assert a == b and a != cls.all_defaults()


def test_unknown_hparam_rejected(backbone):
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        get_method("coop")(backbone, NAMES, 3, {"lr_typo": 1.0})


def test_zero_shot_predicts_shapes(backbone):
    m = get_method("zero-shot")(backbone, NAMES, 3, {"ensemble": True})
    b = _batch()
    assert m.predict(b.images).shape == (16, 4)
    assert m.update(b) == {}
    # same logits from cached features
    torch.testing.assert_close(m.predict(backbone.image_features(b.images)), m.predict(b.images))


@pytest.mark.parametrize("name,hp", [
    ("coop", {}),
    ("coop", {"class_specific": True, "n_ctx": 4}),
    ("cocoop", {}),
    ("dpl", {"dropout": 0.0}),
])
def test_training_reduces_loss_and_keeps_backbone_frozen(backbone, name, hp):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    # AdamW: the random-weight tower gives near-identical features; SGD at paper lr crawls there
    m = get_method(name)(backbone, NAMES, 3, {"optimizer": "adamw", "lr": 0.02, "weight_decay": 0.0, "warmup_fraction": 0.0, **hp})
    m.configure_optimizers(1000)
    b = _batch()
    b.features = backbone.image_features(b.images)
    losses = [m.update(b)["loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert m.predict(b.features).shape == (16, 4)
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    state = m.method_state_dict()
    assert not any(k.startswith("prompt_encoder.") for k in state) and state  # backbone never saved
    assert all(p.grad is None or p.requires_grad for p in backbone.model.parameters())


def test_dpl_domain_mean_matches_loop(backbone):
    torch.manual_seed(0)
    m = get_method("dpl")(backbone, NAMES, 3, {"dropout": 0.0})
    m.eval()
    f = backbone.image_features(_batch().images).pooled
    dom = torch.tensor([0, 2, 2, 0, 1, 1, 1, 0, 2, 0, 1, 2, 0, 0, 1, 2])
    tok = m.tokens(f)
    _, inv = torch.unique(dom, return_inverse=True)
    onehot = torch.nn.functional.one_hot(inv).float()
    batched = torch.einsum("bd,bmw->dmw", onehot, tok) / onehot.sum(0).view(-1, 1, 1)
    ref = torch.stack([tok[dom == d].mean(0) for d in range(3)])  # test oracle only
    torch.testing.assert_close(batched, ref)


def test_prompt_encoder_matches_encode_text(backbone):
    from dgclip.prompting import ClassPromptEncoder, init_context

    import torch.nn.functional as F

    enc = ClassPromptEncoder(backbone, NAMES, 4)
    out = enc(init_context(backbone, 4, "a photo of a"))[0]
    ref = F.normalize(backbone.encode_text([f"a photo of a {n}." for n in NAMES]), dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    ctx = torch.randn(3, 4, 64)
    many = enc(ctx)
    torch.testing.assert_close(many[1], enc(ctx[1])[0], atol=1e-5, rtol=1e-4)
    cs = enc(ctx[:, None].expand(3, 4, 4, 64)[0], class_specific=True)
    torch.testing.assert_close(cs[0], enc(ctx[0])[0], atol=1e-5, rtol=1e-4)


def test_hparam_draws_are_seeded_per_name():
    """DomainBed's per-name seeding: each hyper-parameter is drawn from a generator seeded by its own
    name, so a subclass that draws an extra option first leaves every other draw unchanged."""
    coop = get_method("coop")

    class WithExtra(coop):
        default_hparams = {"extra": 0.0}

        @classmethod
        def search_space(cls, rng):
            extra = float(rng("extra").uniform())  # drawn BEFORE the base draws
            hp = super().search_space(rng)
            hp["extra"] = extra
            return hp

    for seed in (1, 2, 7):
        a, b = coop.hparams_for(seed), WithExtra.hparams_for(seed)
        assert {k: b[k] for k in a} == a
    assert len({coop.hparams_for(s)["lr"] for s in range(1, 6)}) == 5
    assert get_method("dpl").hparams_for(4)["weight_decay"] == 0.0  # a paper's 0 is not searched
    for name in ("coop", "cocoop", "dpl", "dalsclip", "gopro", "seeclip"):
        # one search rule for every method: lr log-uniform over [default / 10, default * 10]
        cls = get_method(name)
        centre = np.log10(cls.all_defaults()["lr"])
        for seed in range(1, 6):
            hp = cls.hparams_for(seed)
            assert centre - 1 <= np.log10(hp["lr"]) <= centre + 1 and hp["batch_size"] in cls.batch_sizes


def test_dpl_init_and_weight_decay_as_released(backbone):
    m = get_method("dpl")(backbone, NAMES, 3, {})
    assert m.hparams["weight_decay"] == 0.0
    linears = [l for l in m.mlp if isinstance(l, torch.nn.Linear)]
    assert all(torch.equal(l.bias, torch.full_like(l.bias, 0.01)) for l in linears)
    w = linears[0].weight
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5  # Xavier-uniform, not nn.Linear's 1/sqrt(fan_in)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_cocoop_meta_net_sees_normalised_features(backbone):
    m = get_method("cocoop")(backbone, NAMES, 3, {})
    f = torch.randn(5, backbone.embed_dim)
    torch.testing.assert_close(m.text_features(f), m.text_features(7.0 * f))


def test_train_augment_option(backbone):
    from torchvision import transforms as T

    base = backbone.preprocess_val
    for name in ("dpl", "dalsclip"):  # released DPL: CLIP's eval preprocess, cacheable
        assert get_method(name)(backbone, NAMES, 3, {}).make_train_transform(base) is base
    for name in ("coop", "cocoop"):  # released CoOp / CoCoOp: Dassl's crop + flip, bicubic
        tf = get_method(name)(backbone, NAMES, 3, {}).make_train_transform(base)
        crop = tf.transforms[0].transforms[0]
        assert crop.scale == (0.08, 1.0) and any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms[0].transforms)
        assert get_method(name).defaults_for(embedded=True)["train_augment"] == "crop"  # a mirrored digit is another symbol
    for name in ("coop", "cocoop", "dpl", "dalsclip"):
        tf = get_method(name)(backbone, NAMES, 3, {"train_augment": "crop"}).make_train_transform(base)
        assert isinstance(tf, T.Compose) and tf.transforms[-1] is base
        assert not any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms[0].transforms)
    tf = get_method("coop")(backbone, NAMES, 3, {"train_augment": "crop_flip"}).make_train_transform(base)
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms[0].transforms)
    with pytest.raises(ValueError, match="train_augment must be one of"):
        get_method("coop")(backbone, NAMES, 3, {"train_augment": "jitter"}).make_train_transform(base)


def test_embedded_defaults_hold_only_data_facts():
    """No tuned value on the embedded default: only overrides that follow from what the data is
    (no flip on digits), each with its reason; a random-search trial keeps them."""
    for name in list_methods():
        cls = get_method(name)
        assert set(cls.embedded_hparams) <= {"train_augment", "hflip"}, name
        assert set(cls.embedded_hparams) == set(cls.embedded_sources), name
        emb = cls.hparams_for(0, embedded=True)
        assert emb == {**cls.all_defaults(), **cls.embedded_hparams}
    gopro = get_method("gopro")
    trial = gopro.hparams_for(3, embedded=True)
    assert trial["hflip"] is False and trial["lr"] == gopro.hparams_for(3)["lr"]


def test_every_default_has_a_source():
    from dgclip.provenance import SOURCE_KINDS

    for name in list_methods():
        table = get_method(name).sourced_defaults(embedded=True)
        assert set(table) == set(get_method(name).all_defaults())
        assert all(e.source.split(":", 1)[0] in SOURCE_KINDS and len(e.source) > 12 for e in table.values()), name


def test_dpl_loss_forms(backbone):
    """Released DPLCLIP.update: [B, D*K] logits against every domain's prompts, labels in [0, K);
    options: each image against its own domain's prompts, or the fixed index d*K + y."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = get_method("dpl")(backbone, NAMES, 3, {"dropout": 0.0})
    b = _batch()
    b.features = backbone.image_features(b.images)
    f = b.features.pooled
    tok = m.tokens(f)
    doms = torch.unique(b.domains)
    mean_tok = torch.stack([tok[b.domains == d].mean(0) for d in doms])
    text = F.normalize(m.prompt_encoder(mean_tok), dim=-1)  # [D, K, E]
    k = len(NAMES)
    logits = backbone.logit_scale * F.normalize(f, dim=-1) @ text.reshape(-1, text.shape[-1]).t()  # [B, D*K]
    assert logits.shape[1] == len(doms) * k
    d_idx = torch.searchsorted(doms, b.domains)
    want = {"released": F.cross_entropy(logits, b.labels),
            "all_prompts_own_label": F.cross_entropy(logits, d_idx * k + b.labels),
            "own_domain": F.cross_entropy(logits.view(len(f), len(doms), k)[torch.arange(len(f)), d_idx], b.labels)}
    assert m.hparams["loss_form"] == "released"
    for form, value in want.items():
        m.hparams["loss_form"] = form
        torch.testing.assert_close(m.training_losses(b)["loss"], value, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="loss_form must be one of"):
        get_method("dpl")(backbone, NAMES, 3, {"loss_form": "mine"})


def test_update_returns_losses_on_the_device_without_a_host_sync(backbone):
    """update() hands back detached tensors (no float() per step); the engine syncs when it logs."""
    m = get_method("dpl")(backbone, NAMES, 3, {"batch_scope": "per_domain"})
    m.configure_optimizers(10)
    b = _batch()
    b.features = backbone.image_features(b.images)
    out = m.update(b)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 for v in out.values())


def test_one_optimizer_factory_with_constant_warmup(backbone):
    m = get_method("coop")(backbone, NAMES, 3, {})
    m.configure_optimizers(100)  # released: 1 of 50 epochs at a constant 1e-5, then cosine from 2e-3
    lrs = []
    for _ in range(4):
        lrs.append(m.optimizer.param_groups[0]["lr"])
        m.optimizer.step()
        m.scheduler.step()
    assert lrs[:2] == pytest.approx([1e-5, 1e-5]) and lrs[2] == pytest.approx(2e-3)
    assert isinstance(get_method("seeclip").all_defaults()["optimizer"], str)
