"""Evaluation metrics in plain numpy (no scikit-learn at runtime)."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _np(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def accuracy(proba: ArrayLike, labels: ArrayLike) -> float:
    """Share of rows whose most probable class (proba (N, C)) equals the label."""
    p = _np(proba)
    y = _np(labels).astype(np.int64)
    if len(y) == 0:
        return float("nan")
    return float(np.mean(p.argmax(axis=1) == y))


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Binary ROC AUC from ranks (Mann-Whitney U), ties counted as one half."""
    s = _np(scores).astype(np.float64).reshape(-1)
    y = _np(labels).astype(bool).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over runs of equal scores.
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, fpr: float) -> float:
    """Highest true-positive rate over thresholds whose false-positive rate is <= `fpr`.

    Higher score means "positive"; rows with equal scores are always classified together.
    """
    s = _np(scores).astype(np.float64).reshape(-1)
    y = _np(labels).astype(bool).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # Only the last row of each run of equal scores is a valid cut.
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tpr = np.r_[0.0, tp[last] / n_pos]
    fpr_v = np.r_[0.0, fp[last] / n_neg]
    ok = fpr_v <= fpr + 1e-12
    return float(tpr[ok].max())


def roc_summary(
    scores: ArrayLike, labels: ArrayLike, fprs: tuple[float, ...]
) -> tuple[float, list[float]]:
    """`auc(scores, labels)` and `tpr_at_fpr(scores, labels, f)` for each of `fprs`, from
    one sort: the same numbers (the AUC's Mann-Whitney sum is counted in integers,
    ties one half each, so it is the rank formula's exactly)."""
    s = _np(scores).astype(np.float64).reshape(-1)
    y = _np(labels).astype(bool).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan"), [float("nan")] * len(fprs)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # the last row of each run of ties
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(~y_sorted)[last]
    tp_run = np.diff(np.r_[0, tp])
    fp_run = np.diff(np.r_[0, fp])
    # Each negative is beaten by the positives of higher runs and ties half of its own.
    twice_u = int(np.sum(fp_run * (2 * (tp - tp_run) + tp_run)))
    tpr = np.r_[0.0, tp / n_pos]
    fpr_v = np.r_[0.0, fp / n_neg]
    tprs = [float(tpr[fpr_v <= f + 1e-12].max()) for f in fprs]
    return float(twice_u / (2 * n_pos * n_neg)), tprs
