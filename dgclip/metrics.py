"""Closed-set and open-set domain-generalization metrics.

Conventions: `num_known` = C known classes with labels 0..C-1; any label >= C is an unknown
sample. Open-set logits are [N, C+1] with the last column = "unknown". Closed-set logits [N, C]
get an unknown score of 1 - max softmax (and, where a hard unknown decision is needed, the fixed
non-oracle rule "unknown if max softmax < `closed_threshold`").
The names below are the record fields used in results (DESIGN.md sec. 3):
  acc, closed_acc, known_acc, unknown_recall, h_score, h_score_swept_oracle, auroc, oscr.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["accuracy", "closed_set_accuracy", "known_accuracy", "unknown_recall", "h_score",
           "threshold_swept_h_score", "auroc", "oscr", "unknown_scores", "open_set_predictions",
           "open_set_metrics", "OPEN_SET_METRICS"]

OPEN_SET_METRICS = ("closed_acc", "known_acc", "unknown_recall", "h_score", "h_score_swept_oracle",
                    "auroc", "oscr")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


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


def open_set_predictions(logits, num_known: int, closed_threshold: float = 0.5) -> np.ndarray:
    """Hard (C+1)-way decisions: argmax for open-set logits; thresholded max softmax otherwise."""
    x = _np(logits)
    if x.shape[1] == num_known + 1:
        return x.argmax(axis=1)
    if x.shape[1] != num_known:
        raise ValueError(f"logits have {x.shape[1]} columns; expected C={num_known} or C+1")
    p = _softmax(x)
    pred = p.argmax(axis=1)
    pred[p.max(axis=1) < closed_threshold] = num_known
    return pred


def unknown_scores(logits, num_known: int) -> np.ndarray:
    """Higher = more likely unknown: p(unknown) for C+1 logits, 1 - max softmax for C logits."""
    x = _np(logits)
    p = _softmax(x)
    if x.shape[1] == num_known + 1:
        return p[:, num_known]
    return 1.0 - p.max(axis=1)


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
    """Best H over `num_thresholds` thresholds on the unknown score (ORACLE: uses target labels).

    Thresholds are the (i + 0.5) / n quantiles of the unknown scores; a sample is unknown when its
    score >= threshold, else the argmax over the known columns. Returns (best H, its threshold).
    """
    x, y = _np(logits), _np(labels)
    s = unknown_scores(x, num_known)
    known_pred = x[:, :num_known].argmax(axis=1)
    qs = (np.arange(num_thresholds) + 0.5) / num_thresholds
    best, best_t = -1.0, float("nan")
    for t in np.quantile(s, qs):  # 10 thresholds, not a per-sample loop
        pred = np.where(s >= t, num_known, known_pred)
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
    c = -unknown_scores(x, num_known)
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


def open_set_metrics(logits, labels, num_known: int, closed_threshold: float = 0.5) -> dict[str, float]:
    """Every open-set metric for one evaluation (names as in OPEN_SET_METRICS)."""
    x, y = _np(logits), _np(labels)
    pred = open_set_predictions(x, num_known, closed_threshold)
    ka, ur = known_accuracy(pred, y, num_known), unknown_recall(pred, y, num_known)
    swept, _ = threshold_swept_h_score(x, y, num_known)
    return {
        "closed_acc": closed_set_accuracy(x, y, num_known),
        "known_acc": ka,
        "unknown_recall": ur,
        "h_score": h_score(ka, ur),
        "h_score_swept_oracle": swept,
        "auroc": auroc(unknown_scores(x, num_known), y >= num_known),
        "oscr": oscr(x, y, num_known),
    }
