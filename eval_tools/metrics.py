"""Downstream metrics: macro ROC-AUC / PR-AUC for multi-label tagging, accuracy for classes.

Written in numpy (no scikit-learn at run time) and tested against scikit-learn on known inputs.
Tie handling follows scikit-learn: ROC-AUC counts tied positive/negative pairs as one half, and
average precision steps through distinct score thresholds.
"""

from __future__ import annotations

import numpy as np


def _rankdata_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method='average')``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC-AUC (Mann-Whitney U); NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rankdata_average(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary average precision (area under the step PR curve); NaN when there is no positive."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    # one point per distinct threshold: the last index of each run of equal scores
    last = np.concatenate([np.flatnonzero(np.diff(ss)), [len(ss) - 1]])
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_prev = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - recall_prev) * precision))


def per_tag_scores(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ROC-AUC and AP for ``(N, K)`` 0/1 targets and scores; NaN for degenerate tags."""
    y_true = np.asarray(y_true)
    score = np.asarray(score)
    if y_true.shape != score.shape or y_true.ndim != 2:
        raise ValueError(f"expected two (N, K) arrays of equal shape, got {y_true.shape} and {score.shape}")
    aucs = np.array([roc_auc(y_true[:, k], score[:, k]) for k in range(y_true.shape[1])])
    aps = np.array([average_precision(y_true[:, k], score[:, k]) for k in range(y_true.shape[1])])
    return aucs, aps


def macro_roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Mean ROC-AUC over tags that have both positives and negatives in ``y_true``."""
    aucs, _ = per_tag_scores(y_true, score)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def macro_pr_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Mean average precision over tags that have at least one positive in ``y_true``."""
    _, aps = per_tag_scores(y_true, score)
    return float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if len(y_true) == 0:
        return float("nan")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm
