"""Closed-set and open-set domain-generalization metrics.

Conventions: `num_known` = C known classes with labels 0..C-1; any label >= C is an unknown
sample. Open-set logits are [N, C+1] with the last column = "unknown". Every method gets a
known-class confidence, computed as a LOG probability in float64 from the logits
(`known_log_confidence`): log(1 - p(unknown)) = logsumexp(known logits) - logsumexp(all logits)
for C+1 logits, log max softmax for C logits. In float32, 1 - p(unknown) rounds to 0 for every
sample whose p(unknown) is within 6e-8 of 1 (at CLIP's logit scale 100 that is a cosine margin of
0.17), so the hard unknowns would all tie; the log form keeps their order. Thresholds and every
ranking metric (AUROC, OSCR, the swept H) use this log confidence.

Decision rules (DESIGN.md sec. 3):
  h_score              the COMMON rule, one for every method: unknown when the known-class
                       confidence is below a threshold calibrated on SOURCE validation knowns
                       only (`calibrate_threshold`: accept 95% of them); otherwise the argmax
                       over the known columns. No target data, no labels of the target.
  h_score_native       the method's own rule: argmax over C+1 for an open-set method; NaN for a
                       closed-set method (it has no native unknown). known_acc_native /
                       unknown_recall_native are its parts: known_acc_native is the (C+1)-way
                       accuracy on target knowns that ODG-CLIP and SeeCLIP report as "Acc".
  h_score_swept_oracle MEDIC/DAML's sweep: 10 thresholds EVENLY SPACED between the min and max
                       confidence on the target, the best H reported: uses target labels (oracle).
known_acc / unknown_recall belong to the common rule; auroc, oscr need no threshold.
OSCR tie rule: samples with EQUAL confidence enter the CCR/FPR curve together (one point per
distinct confidence, trapezoids between points), so the value does not depend on the order of
tied samples. (MEDIC's and ARPL's implementations differ on ties: one sorts and steps sample by
sample, the other thresholds at each score; both agree with this rule when there are no ties.)
Record fields: closed_acc, known_acc, unknown_recall, h_score, known_acc_native,
unknown_recall_native, h_score_native, h_score_swept_oracle, auroc, oscr, threshold (a log
confidence).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["known_log_confidence", "accuracy", "closed_set_accuracy", "known_accuracy", "unknown_recall", "h_score",
           "threshold_swept_h_score", "auroc", "oscr", "unknown_scores", "known_confidence",
           "calibrate_threshold", "threshold_predictions", "native_predictions", "open_set_predictions",
           "open_set_metrics", "OPEN_SET_METRICS", "DEFAULT_ACCEPT_RATE"]

OPEN_SET_METRICS = ("closed_acc", "known_acc", "unknown_recall", "h_score", "known_acc_native",
                    "unknown_recall_native", "h_score_native", "h_score_swept_oracle", "auroc", "oscr")
DEFAULT_ACCEPT_RATE = 0.95  # the common rule accepts 95% of the source-validation knowns


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):  # float64: confidences are differences of logsumexps
        return x.detach().double().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits_or_preds, labels) -> float:
    """Top-1 accuracy; accepts [N, K] logits or [N] predictions."""
    x, y = _np(logits_or_preds), _np(labels)
    pred = x.argmax(axis=1) if x.ndim == 2 else x
    if y.size == 0:
        return float("nan")
    return float((pred == y).mean())


def closed_set_accuracy(logits, labels, num_known: int) -> float:
    """C-way accuracy on the known-class samples (argmax over the C known columns only)."""
    x, y = _np(logits), _np(labels)
    known = y < num_known
    return accuracy(x[known][:, :num_known], y[known])


def _check_columns(x: np.ndarray, num_known: int) -> None:
    if x.ndim != 2 or x.shape[1] not in (num_known, num_known + 1):
        raise ValueError(f"logits have shape {x.shape}; expected [N, C={num_known}] or [N, C+1]")


def known_log_confidence(logits, num_known: int) -> np.ndarray:
    """float64 log of the known-class confidence, from the logits without forming 1 - p:
    log(1 - p(unknown)) = logsumexp(x[:, :C]) - logsumexp(x) for C+1 logits; log max softmax
    = max(x) - logsumexp(x) for C logits."""
    x = np.asarray(_np(logits), dtype=np.float64)
    _check_columns(x, num_known)
    if x.shape[0] == 0:
        return np.zeros(0)
    if x.shape[1] == num_known + 1:
        return _logsumexp(x[:, :num_known]) - _logsumexp(x)
    return x.max(axis=1) - _logsumexp(x)


def known_confidence(logits, num_known: int) -> np.ndarray:
    """Higher = more likely known (a log probability, see `known_log_confidence`)."""
    return known_log_confidence(logits, num_known)


def unknown_scores(logits, num_known: int) -> np.ndarray:
    """Higher = more likely unknown: the negative known log-confidence (same order as p(unknown)
    for C+1 logits and 1 - max softmax for C logits, without their float saturation)."""
    return -known_log_confidence(logits, num_known)


def calibrate_threshold(source_val_logits, num_known: int, accept_rate: float = DEFAULT_ACCEPT_RATE) -> float:
    """The confidence threshold that accepts `accept_rate` of the SOURCE validation images
    (all known by construction): the (1 - accept_rate) quantile of their confidences."""
    if not 0.0 < accept_rate <= 1.0:
        raise ValueError(f"accept_rate must be in (0, 1], got {accept_rate}")
    c = known_confidence(source_val_logits, num_known)
    if c.size == 0:
        raise ValueError("no source-validation logits to calibrate the open-set threshold on")
    return float(np.quantile(c, 1.0 - accept_rate, method="lower"))


def threshold_predictions(logits, num_known: int, threshold: float) -> np.ndarray:
    """Common rule: unknown (C) when known confidence < threshold, else argmax over known columns."""
    x = _np(logits)
    pred = x[:, :num_known].argmax(axis=1)
    pred[known_confidence(x, num_known) < threshold] = num_known
    return pred


def native_predictions(logits, num_known: int) -> np.ndarray | None:
    """The method's own rule: argmax over C+1 columns; None for closed-set logits."""
    x = _np(logits)
    _check_columns(x, num_known)
    return x.argmax(axis=1) if x.shape[1] == num_known + 1 else None


def open_set_predictions(logits, num_known: int, threshold: float) -> np.ndarray:
    """Hard (C+1)-way decisions under the common rule (see `threshold_predictions`)."""
    return threshold_predictions(logits, num_known, threshold)


def known_accuracy(preds, labels, num_known: int) -> float:
    """(C+1)-way accuracy on known samples: predicted unknown counts as wrong."""
    p, y = _np(preds), _np(labels)
    known = y < num_known
    return accuracy(p[known], y[known])


def unknown_recall(preds, labels, num_known: int) -> float:
    """Fraction of unknown samples predicted as unknown (class C)."""
    p, y = _np(preds), _np(labels)
    unk = y >= num_known
    if not unk.any():
        return float("nan")
    return float((p[unk] == num_known).mean())


def h_score(known_acc: float, unk_recall: float) -> float:
    """Harmonic mean of known accuracy and unknown recall (0 if either is 0)."""
    if np.isnan(known_acc) or np.isnan(unk_recall):
        return float("nan")
    if known_acc + unk_recall == 0:
        return 0.0
    return float(2 * known_acc * unk_recall / (known_acc + unk_recall))


def threshold_swept_h_score(logits, labels, num_known: int, num_thresholds: int = 10) -> tuple[float, float]:
    """Best H over `num_thresholds` thresholds on the known confidence (ORACLE: target labels).

    MEDIC/DAML: thresholds evenly spaced between the min and max confidence on the evaluated set
    (np.linspace, both ends included); a sample is unknown when its confidence < threshold, else
    the argmax over the known columns. Returns (best H, its threshold).
    """
    x, y = _np(logits), _np(labels)
    c = known_confidence(x, num_known)
    known_pred = x[:, :num_known].argmax(axis=1)
    best, best_t = -1.0, float("nan")
    for t in np.linspace(c.min(), c.max(), num_thresholds):  # 10 thresholds, not a per-sample loop
        pred = np.where(c < t, num_known, known_pred)
        h = h_score(known_accuracy(pred, y, num_known), unknown_recall(pred, y, num_known))
        if h > best:
            best, best_t = h, float(t)
    return float(best), best_t


def auroc(scores, is_positive) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    s, pos = _np(scores).astype(np.float64), _np(is_positive).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over tie groups
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def oscr(logits, labels, num_known: int) -> float:
    """Open-Set Classification Rate (Dhamija et al. 2018): area under CCR vs FPR.

    Known confidence c = -unknown score. For a threshold theta: CCR = fraction of known samples
    classified correctly (argmax over known columns) with c >= theta; FPR = fraction of unknown
    samples with c >= theta. Tied confidences enter the curve together; trapezoidal area.
    """
    x, y = _np(logits), _np(labels)
    c = known_log_confidence(x, num_known)
    known = y < num_known
    n_k, n_u = int(known.sum()), int((~known).sum())
    if n_k == 0 or n_u == 0:
        return float("nan")
    correct = (x[:, :num_known].argmax(axis=1) == y) & known
    order = np.argsort(-c, kind="mergesort")
    cs = c[order]
    last_of_group = np.r_[cs[1:] != cs[:-1], True]
    ccr = np.r_[0.0, np.cumsum(correct[order])[last_of_group] / n_k]
    fpr = np.r_[0.0, np.cumsum(~known[order])[last_of_group] / n_u]
    return float(np.trapezoid(ccr, fpr) if hasattr(np, "trapezoid") else np.trapz(ccr, fpr))


def open_set_metrics(logits, labels, num_known: int, threshold: float) -> dict[str, float]:
    """Every open-set metric for one evaluation (names as in OPEN_SET_METRICS).

    threshold: the common rule's confidence threshold, from `calibrate_threshold` on the source
    validation logits (never on the evaluated set).
    """
    x, y = _np(logits), _np(labels)
    _check_columns(x, num_known)
    pred = threshold_predictions(x, num_known, threshold)
    ka, ur = known_accuracy(pred, y, num_known), unknown_recall(pred, y, num_known)
    swept, _ = threshold_swept_h_score(x, y, num_known)
    native = native_predictions(x, num_known)
    ka_native = float("nan") if native is None else known_accuracy(native, y, num_known)
    ur_native = float("nan") if native is None else unknown_recall(native, y, num_known)
    return {
        "closed_acc": closed_set_accuracy(x, y, num_known),
        "known_acc": ka,
        "unknown_recall": ur,
        "h_score": h_score(ka, ur),
        "known_acc_native": ka_native,
        "unknown_recall_native": ur_native,
        "h_score_native": h_score(ka_native, ur_native),
        "threshold": float(threshold),
        "h_score_swept_oracle": swept,
        "auroc": auroc(unknown_scores(x, num_known), y >= num_known),
        "oscr": oscr(x, y, num_known),
    }
