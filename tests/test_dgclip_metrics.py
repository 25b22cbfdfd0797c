import math

import numpy as np
import pytest

from dgclip import metrics as M

# 3 known classes (0, 1, 2), unknown label 3. Open-set logits [N, 4].
LOGITS = np.array([
    [5.0, 0.0, 0.0, 1.0],   # y=0 -> pred 0 (correct)
    [0.0, 5.0, 0.0, 1.0],   # y=1 -> pred 1 (correct)
    [0.0, 0.0, 1.0, 5.0],   # y=2 -> pred unknown (wrong in C+1; C-way pred 2 correct)
    [4.0, 0.0, 0.0, 1.0],   # y=1 -> pred 0 (wrong)
    [0.0, 0.0, 0.0, 5.0],   # y=3 -> pred unknown (correct)
    [3.0, 0.0, 0.0, 1.0],   # y=3 -> pred 0 (missed)
])
LABELS = np.array([0, 1, 2, 1, 3, 3])


def test_accuracy_and_closed_set():
    assert M.accuracy(LOGITS[:4, :3], LABELS[:4]) == pytest.approx(3 / 4)
    assert M.accuracy(np.array([1, 2]), np.array([1, 0])) == 0.5
    # C-way on the 4 known samples: preds 0,1,2,0 vs 0,1,2,1
    assert M.closed_set_accuracy(LOGITS, LABELS, 3) == pytest.approx(3 / 4)


def test_known_accuracy_unknown_recall_h():
    pred = M.native_predictions(LOGITS, 3)
    assert list(pred) == [0, 1, 3, 0, 3, 0]
    assert M.known_accuracy(pred, LABELS, 3) == pytest.approx(2 / 4)
    assert M.unknown_recall(pred, LABELS, 3) == pytest.approx(1 / 2)
    assert M.h_score(0.5, 0.5) == pytest.approx(0.5)
    assert M.h_score(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert M.h_score(0.0, 0.0) == 0.0


def test_closed_logits_threshold_rule():
    logits = np.log(np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]]))
    # thresholds are log confidences (metrics.py: no float saturation of 1 - p)
    assert list(M.threshold_predictions(logits, 3, np.log(0.5))) == [0, 3]
    np.testing.assert_allclose(M.unknown_scores(logits, 3), -np.log([0.9, 0.4]), rtol=1e-6)
    assert M.native_predictions(logits, 3) is None  # a closed-set method has no native unknown


def test_auroc_hand_cases():
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # one tie between a positive and a negative counts 1/2: pairs (p,n): 0.5 vs 0.5 tie, 0.5>0.1, 0.9>0.5, 0.9>0.1
    assert M.auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)
    assert math.isnan(M.auroc([0.1, 0.2], [0, 0]))


def test_oscr_hand_cases():
    # perfect: knowns correct and more confident than unknowns -> 1
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 6.0]])
    labels = np.array([0, 1, 2, 2])  # 2 known classes; label 2 = unknown
    assert M.oscr(logits, labels, 2) == pytest.approx(1.0)
    # all unknowns more confident than knowns -> 0
    assert M.oscr(np.array([[0.0, 0.0, 5.0], [5.0, 0.0, -5.0]]), np.array([0, 2]), 2) == pytest.approx(0.0)
    # knowns: one correct (conf high) one wrong; 2 unknowns, one above and one below the correct known
    # known confidence = 1 - p(unknown): unk(0.995), known-correct(0.95), known-wrong(0.9), unk(0.1)
    # curve points (FPR, CCR): (0,0) -> (0.5,0) -> (0.5,0.5) -> (0.5,0.5) -> (1,0.5): area 0.25
    p = np.array([[0.99, 0.005, 0.005], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.05, 0.05, 0.9]])
    assert M.oscr(np.log(p), np.array([2, 0, 1, 2]), 2) == pytest.approx(0.25)


def test_threshold_swept_h_uses_medic_evenly_spaced_thresholds():
    best, t = M.threshold_swept_h_score(LOGITS, LABELS, 3)
    c = M.known_confidence(LOGITS, 3)
    grid = np.linspace(c.min(), c.max(), 10)
    assert np.isclose(grid, t).any() and 0 <= best <= 1
    hs = [M.open_set_metrics(LOGITS, LABELS, 3, threshold=g)["h_score"] for g in grid]
    assert best == pytest.approx(max(hs))
    # separable scores: some threshold gets H = 1
    logits = np.array([[5.0, 0.0, -9.0], [0.0, 5.0, -9.0], [0.0, 0.0, 9.0], [0.0, 0.0, 9.0]])
    assert M.threshold_swept_h_score(logits, np.array([0, 1, 2, 2]), 2)[0] == pytest.approx(1.0)


def test_open_set_metrics_names_and_rules():
    # threshold 0.5 on 1 - p(unknown): rows 2 and 4 are unknown, the rest argmax over known columns
    m = M.open_set_metrics(LOGITS, LABELS, 3, threshold=np.log(0.5))
    assert set(m) == set(M.OPEN_SET_METRICS) | {"threshold"}
    assert m["known_acc"] == pytest.approx(2 / 4) and m["unknown_recall"] == pytest.approx(1 / 2)
    assert m["h_score_native"] == pytest.approx(0.5)
    closed = M.open_set_metrics(LOGITS[:, :3], LABELS, 3, threshold=np.log(0.5))
    assert math.isnan(closed["h_score_native"]) and 0 <= closed["h_score"] <= 1


def test_common_rule_threshold_accepts_95_percent_of_source_validation():
    rng = np.random.default_rng(0)
    val = rng.normal(size=(400, 5)) * 3
    t = M.calibrate_threshold(val, 5)
    accepted = (M.known_confidence(val, 5) >= t).mean()
    assert 0.95 <= accepted <= 0.955
    # the same rule for a closed-set and an open-set method: confidence 1 - p(unknown) vs max softmax
    t_open = M.calibrate_threshold(np.c_[val, rng.normal(size=400)], 5)
    assert t_open < 0  # a log confidence
    with pytest.raises(ValueError, match="accept_rate"):
        M.calibrate_threshold(val, 5, accept_rate=0.0)
    with pytest.raises(ValueError, match="expected"):
        M.open_set_metrics(val, np.zeros(400, dtype=int), 3, threshold=0.5)


def test_results_table_marks_transductive_and_names_the_rule():
    from dgclip.results import format_table, summarise

    recs = [{"dataset": "d", "method": m, "selection": "training-domain validation", "seed": s, "test_domain": t,
             "h_score": 0.5, "h_score_native": float("nan") if m != "seeclip" else 0.4, "transductive": m == "dpl"}
            for m in ("dpl", "seeclip") for s in (0, 1) for t in ("a", "b")]
    table = format_table(summarise(recs, "h_score"))
    assert "dpl *" in table and "transductive" in table and "SOURCE-validation" in table
    native = format_table(summarise(recs, "h_score_native"))
    assert "| dpl *" in native and " - " in native and "40.0 +- 0.0" in native
