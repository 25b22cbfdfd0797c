"""Open-set confidences in log space: at CLIP's logit scale 100, float32 1 - p(unknown) rounds to
0 for the hard unknowns (and many knowns), tying them; the log form keeps their order, so AUROC and
OSCR from float32 logits equal a float64 reference."""
import numpy as np
import pytest
import torch

from dgclip.metrics import (auroc, known_log_confidence, open_set_metrics, oscr, threshold_swept_h_score,
                            unknown_scores)


def _hard_open_set(n_known=400, n_unknown=400, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.randint(C, (n_known,), generator=g), torch.full((n_unknown,), C)])
    cos = 0.2 + 0.02 * torch.randn(len(labels), C + 1, generator=g, dtype=torch.float64)
    cos[torch.arange(n_known), labels[:n_known]] += 0.05  # knowns: a small margin on their class
    # every unknown sits far above the known columns (p(unknown) within 1e-8 of 1), by a varying margin
    cos[n_known:, C] += 0.2 + 0.15 * torch.rand(n_unknown, generator=g, dtype=torch.float64)
    cos[:n_known, C] += 0.19 + 0.15 * torch.rand(n_known, generator=g, dtype=torch.float64)
    return 100.0 * cos, labels, C


def _reference_auroc(scores, positive):  # float64 pairwise definition (ties count 1/2)
    s = np.asarray(scores, dtype=np.float64)
    p, n = s[positive], s[~positive]
    diff = p[:, None] - n[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_float32_logits_give_the_float64_metrics():
    logits64, labels, C = _hard_open_set()
    logits32 = logits64.float()
    unknown = (labels >= C).numpy()
    # the old form saturates: 1 - softmax in float32 is exactly 0 for most samples
    p32 = torch.softmax(logits32, -1)[:, C]
    assert ((1 - p32) == 0).float().mean() > 0.3
    # the log form from float32 logits orders like float64
    ref = _reference_auroc(-known_log_confidence(logits64.numpy(), C), unknown)
    assert auroc(unknown_scores(logits32, C), unknown) == pytest.approx(ref, abs=1e-6)
    saturated = _reference_auroc(p32.double().numpy(), unknown)
    assert abs(saturated - ref) > 1e-3  # what float32 1 - p loses here
    assert oscr(logits32, labels, C) == pytest.approx(oscr(logits64, labels, C), abs=1e-6)
    m32 = open_set_metrics(logits32, labels, C, threshold=float(np.quantile(known_log_confidence(logits64, C), 0.05)))
    m64 = open_set_metrics(logits64, labels, C, threshold=float(np.quantile(known_log_confidence(logits64, C), 0.05)))
    for k in ("auroc", "oscr", "h_score", "h_score_swept_oracle", "known_acc_native", "h_score_native"):
        assert m32[k] == pytest.approx(m64[k], abs=1e-6), k


def test_log_confidence_is_the_log_of_the_probability():
    x = torch.randn(50, 7, dtype=torch.float64) * 3
    p = torch.softmax(x, -1)
    np.testing.assert_allclose(known_log_confidence(x, 6), np.log1p(-p[:, 6].numpy()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(known_log_confidence(x[:, :6], 6), np.log(torch.softmax(x[:, :6], -1).max(-1).values.numpy()),
                               rtol=1e-12, atol=1e-12)


def test_native_known_accuracy_is_the_c_plus_one_way_accuracy():
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5], [5, 0, 0]])
    labels = torch.tensor([0, 0, 1, 2, 2])  # C = 2: label 2 is unknown
    m = open_set_metrics(logits, labels, 2, threshold=-10.0)
    assert m["known_acc_native"] == pytest.approx(1 / 3)  # known 0 right, known 0 -> 1 wrong, known 1 -> unknown wrong
    assert m["unknown_recall_native"] == pytest.approx(1 / 2)
    assert m["h_score_native"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    closed = open_set_metrics(logits[:, :2], labels, 2, threshold=-10.0)
    assert np.isnan(closed["known_acc_native"]) and np.isnan(closed["h_score_native"])


def test_oscr_ties_enter_together():
    """Tied confidences are one point of the curve: permuting tied samples never changes OSCR."""
    rng = np.random.default_rng(0)
    C = 3
    x = np.zeros((40, C + 1))
    labels = rng.integers(0, C + 1, 40)
    x[np.arange(40), rng.integers(0, C, 40)] = 2.0
    x[:, C] = rng.choice([0.0, 1.0, 3.0], 40)  # only three distinct confidences
    values = set()
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(40)
        values.add(round(oscr(x[perm], labels[perm], C), 12))
    assert len(values) == 1
    best, t = threshold_swept_h_score(x, labels, C)
    assert 0 <= best <= 1 and np.isfinite(t)
