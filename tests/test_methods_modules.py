"""The methods' small modules and loss terms against direct formulas (no backbone needed)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dgclip.methods.prompt_modules import AttentionPromptGenerator, SemanticTokenizer, StackedLinear, StyleContentShift
from dgclip.methods.pseudo_unknown import (FeatureSpaceUnknowns, UnknownRequest, count_for, different_class_partner,
                                           per_domain_anchors)
from dgclip.methods.training import cosine_with_constant_warmup


def test_stacked_linear_matches_separate_linears():
    m = StackedLinear(3, 5, 4)
    x = torch.randn(2, 3, 5)
    want = torch.stack([x[:, g] @ m.weight[g] + m.bias[g] for g in range(3)], dim=1)
    torch.testing.assert_close(m(x), want)
    x2 = torch.randn(2, 5)
    torch.testing.assert_close(m(x2), torch.stack([x2 @ m.weight[g] + m.bias[g] for g in range(3)], dim=1))


def test_style_content_shift_formula():
    layers, width, ctx = 4, 6, 5
    m = StyleContentShift(layers, width, ctx)
    mu, sigma = torch.randn(3, layers, width), torch.rand(3, layers, width)
    per_layer = []
    for l in range(layers):
        style = ((mu[:, l] + sigma[:, l]) / 2) @ m.style.weight[l] + m.style.bias[l]
        content = mu[:, l] @ m.content.weight[l] + m.content.bias[l]
        per_layer.append((style + content) / 2)
    m_l = torch.stack(per_layer, dim=-1)  # [B, C, L]
    want = m_l @ m.layer_mix.weight[0] + m.layer_mix.bias[0]
    torch.testing.assert_close(m(mu, sigma), want)


def test_style_content_shift_rejects_bad_shapes():
    m = StyleContentShift(2, 3, 4)
    with pytest.raises(ValueError, match="layer_mean"):
        m(torch.randn(2, 2, 3), torch.randn(2, 3, 3))


def test_attention_generator_groups_equal_separate_runs():
    gen = AttentionPromptGenerator(8, 6, 3, hidden=10, dropout=0.0).eval()
    x = torch.randn(7, 8)
    group = torch.tensor([0, 2, 0, 2, 2, 0, 0])
    pooled = gen(x, group, pool=True, num_groups=3)
    assert pooled.shape == (3, 3, 6)
    for g in (0, 2):
        alone = gen(x[group == g], None, pool=True)[0]
        torch.testing.assert_close(pooled[g], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[1], torch.zeros(3, 6))  # empty group
    inst = gen(x, torch.arange(7), pool=False)
    solo = torch.stack([gen(x[i:i + 1], None, pool=False)[0] for i in range(7)])
    torch.testing.assert_close(inst, solo, atol=1e-5, rtol=1e-5)


def test_semantic_tokenizer_formula():
    tok = SemanticTokenizer(5, 3)
    patches = torch.randn(2, 7, 5)
    v, alpha = tok(patches)
    for b in range(2):
        for k in range(3):
            a = torch.softmax(patches[b] @ tok.queries[k], dim=0)
            torch.testing.assert_close(alpha[b, k], a)
            torch.testing.assert_close(v[b, k], a @ patches[b])


def test_feature_unknowns_mix_different_classes_and_shift_tokens_by_eps():
    gen = FeatureSpaceUnknowns(ratio=0.25, noise_std=0.2)
    labels = torch.tensor([0, 0, 1, 2, 1, 0, 2, 1])
    pooled, patches = torch.randn(8, 4), torch.randn(8, 5, 4)
    g = torch.Generator().manual_seed(3)
    domains = torch.arange(8) % 2
    out = gen(UnknownRequest(pooled, patches, labels, domains), generator=g)
    # max(1, int(0.25 * 8)) = 2 per source domain (B = the whole batch)
    assert out.pooled.shape == (4, 4) and out.patches.shape == (4, 5, 4) and out.domains.tolist() == [0, 0, 1, 1]
    # replay the draws: anchors (2 per domain), partners (other class, same domain), lam, eps
    g = torch.Generator().manual_seed(3)
    anchors = per_domain_anchors(domains, 0.25, g)
    partners = different_class_partner(labels, anchors, g, domains)
    assert (labels[anchors] != labels[partners]).all() and (domains[anchors] == domains[partners]).all()
    lam = 0.3 + 0.4 * torch.rand(4, 1, generator=g)
    eps = torch.randn(4, 4, generator=g)
    mixed = lam * pooled[anchors] + (1 - lam) * pooled[partners]
    torch.testing.assert_close(out.pooled, mixed + 0.2 * mixed.pow(2).mean(-1, keepdim=True).sqrt() * eps)
    # semantic tokens are convex combinations of patches: each one moves by the same vector
    tok = SemanticTokenizer(4, 3)
    mixed_patches = lam[:, :, None] * patches[anchors] + (1 - lam[:, :, None]) * patches[partners]
    _, alpha = tok(out.patches)
    shift = torch.einsum("bkp,bpe->bke", alpha, out.patches - mixed_patches)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))


def test_feature_unknowns_counts_and_single_class_batch():
    # max(1, int(ratio * B)) as the released scripts (not round: 0.1 * 16 -> 1)
    assert count_for(32, 0.1) == 3 and count_for(4, 0.1) == 1 and count_for(4, 0.0) == 0
    assert count_for(16, 0.1) == 1 and count_for(19, 0.1) == 1
    dom = torch.tensor([0] * 16 + [1] * 32 + [2] * 5)
    anchors = per_domain_anchors(dom[torch.randperm(53)], 0.1, torch.Generator().manual_seed(0))
    assert anchors.numel() == 5 + 5 + 5  # max(1, int(0.1 * 53)) per source domain
    anchors = per_domain_anchors(dom[torch.randperm(53)], 0.2, torch.Generator().manual_seed(0))
    assert anchors.numel() == 10 + 10 + 5  # capped at the domain's images in the batch
    labels = torch.zeros(4, dtype=torch.long)
    partners = different_class_partner(labels, torch.tensor([1, 3]), None)
    assert partners.tolist() == [1, 3]  # no other class: the anchor itself (noise only)
    with pytest.raises(ValueError, match="mix_low"):
        FeatureSpaceUnknowns(mix_low=0.8, mix_high=0.2)


def test_cosine_with_constant_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.002)
    sched = cosine_with_constant_warmup(opt, total_steps=10, warmup_steps=2, warmup_lr=1e-5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(1e-5)
    assert lrs[2] == pytest.approx(0.002)
    assert lrs[6] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_seeclip_loss_terms_against_formulas():
    from dgclip.methods.seeclip_losses import cohesion_loss, l1_regularizer, repulsion_loss

    u, t = torch.randn(3, 6), torch.randn(3, 4, 6)
    want_rep = sum(max(0.0, float(F.cosine_similarity(u[b], t[b, k], dim=0)) - 0.5) for b in range(3) for k in range(4)) / 12
    assert float(repulsion_loss(u, t, 0.5)) == pytest.approx(want_rep, abs=1e-6)
    # the paper's sign pushes cos(u, t_k) down: its gradient on u points away from t
    u_near = (t[:, 0] + 0.3 * torch.randn(3, 6)).requires_grad_()
    repulsion_loss(u_near, t, 0.0).backward()
    cos = lambda x: F.cosine_similarity(x[:, None], t, dim=-1).mean()
    assert cos(u_near.detach() - 0.01 * u_near.grad) < cos(u_near.detach())
    u_near.grad = None
    repulsion_loss(u_near, t, 0.0, sign=-1.0).backward()  # the released code's sign attracts
    assert cos(u_near.detach() - 0.01 * u_near.grad) > cos(u_near.detach())
    tn = F.normalize(t, dim=-1)
    centroid = tn.mean(1)
    want_coh = ((F.normalize(u, dim=-1) - centroid) ** 2).mean()
    torch.testing.assert_close(cohesion_loss(u, t, "image"), want_coh)
    w = torch.randn(2, 3, 4)
    torch.testing.assert_close(l1_regularizer(w, "sum"), w.abs().sum())
    torch.testing.assert_close(l1_regularizer(w, "mean"), w.abs().mean())


def test_gopro_views_from_raw_pil():
    from torchvision import transforms as T

    from dgclip.methods.views import MultiViewTransform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    base = T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    views = MultiViewTransform(base)(img)
    assert set(views) == {"original", "moco", "augmix"}
    assert all(v.shape == (3, 32, 32) for v in views.values())
    assert not torch.equal(views["moco"], views["augmix"])


def test_style_content_shift_zero_init_starts_from_plain_context():
    m = StyleContentShift(3, 5, 4, zero_init=True)
    shift = m(torch.randn(2, 3, 5), torch.rand(2, 3, 5))
    assert torch.equal(shift, torch.zeros(2, 4))
    assert m.layer_mix.weight.requires_grad  # zero start, still trained
    default = StyleContentShift(3, 5, 4)
    assert default(torch.randn(2, 3, 5), torch.rand(2, 3, 5)).abs().sum() > 0


def test_gopro_original_view_without_mirroring_keeps_full_image():
    from dgclip.methods.views import original_view

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    torch.manual_seed(0)
    # crop scale (1, 1) at the image's own aspect ratio and no flip: the view is the image itself
    same = [np.array(original_view((1.0, 1.0), hflip=False)(img)) for _ in range(4)]
    assert all(np.array_equal(s, np.array(img)) for s in same)
    flipped = [np.array(original_view((1.0, 1.0), hflip=True)(img)) for _ in range(16)]
    assert any(np.array_equal(f, np.array(img)[:, ::-1]) for f in flipped)


def test_gopro_augmix_uses_tpt_ops_after_crop_and_flip(monkeypatch):
    """TPT's AugMix list has no colour/contrast/brightness/sharpness ops, and the
    AugMix view is cropped/flipped like the original view first."""
    from torchvision import transforms as T

    from dgclip.methods.views import augmix_view

    tpt = augmix_view("tpt")
    mix = tpt.transforms[-1]
    ops = set(mix._augmentation_space(10, (32, 32)))
    assert ops == {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Posterize", "Solarize",
                   "AutoContrast", "Equalize"}
    assert type(tpt.transforms[0]).__name__ == "_OwnSizeCrop"
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in tpt.transforms)
    full = augmix_view("torchvision").transforms[-1]
    assert {"Brightness", "Color", "Contrast", "Sharpness"} <= set(full._augmentation_space(10, (32, 32)))
    with pytest.raises(ValueError, match="augmix_ops"):
        augmix_view("colour")
