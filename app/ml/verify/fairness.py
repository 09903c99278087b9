"""Per-group fairness before/after unlearning, and weights for a group-reweighted retrain.

Decision rule (`fairness_check`): a group fails on a metric (accuracy, or TPR for binary
tasks) when all three hold:

1. the drop before -> after exceeds `threshold` (absolute, e.g. 0.05 = 5 points);
2. the drop is significant: both predictions are on the same rows, so the comparison is
   paired and McNemar's test applies. With b = rows right before and wrong after and
   c = rows wrong before and right after (among the rows the metric counts: all of the
   group's rows for accuracy, its positives for TPR), the continuity-corrected statistic
   z = (b - c - 1) / sqrt(b + c) must exceed `z` after a Bonferroni correction over
   the m (group, metric) comparisons made: z_required = Phi^-1(1 - (1 - Phi(z)) / m).
   So `z` (2.0, about 2.3% one-sided) is the chance that *any* group is flagged by
   noise alone, not each one: with 5 groups and 2 metrics a per-test z of 2 would flag
   a spread-out, harmless change about one time in five. A paired test is much sharper
   than comparing two proportions, because rows whose prediction did not change carry
   no noise; the continuity correction keeps it honest at the small counts a minority
   group produces;
3. the group has at least `min_group_size` rows; smaller groups are reported but never
   flagged, since their metrics swing by more than any sensible threshold by chance.

FPR is reported but not judged: a rise in FPR without a fall in accuracy or TPR is a
trade-off for the admin to weigh, not a regression this check can name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np


@dataclass
class GroupMetrics:
    """One group's metrics. TPR/FPR are None for multi-class tasks or when undefined."""

    group: str
    column: str
    n: int
    accuracy: float
    tpr: float | None
    fpr: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(hit: np.ndarray) -> float | None:
    return float(hit.mean()) if len(hit) else None


def _is_binary(pred: np.ndarray, labels: np.ndarray) -> bool:
    both = np.concatenate([pred, labels])
    return bool(len(both) == 0 or (both.min() >= 0 and both.max() <= 1))


def _group_rows(values: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(group, its row positions) per distinct value as a string, groups sorted."""
    keys = values if values.dtype.kind == "U" else values.astype(str)
    if len(keys) == 0:
        return []
    groups, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(groups)))[:-1]
    return [(str(g), rows) for g, rows in zip(groups, np.split(order, bounds), strict=True)]


def _check_inputs(labels: np.ndarray, groups: dict[str, np.ndarray], *preds: np.ndarray) -> None:
    n = len(labels)
    for p in preds:
        if len(p) != n:
            raise ValueError("predictions and labels must have one entry per row")
    for name, vals in groups.items():
        if len(vals) != n:
            raise ValueError(f"group column {name!r} has {len(vals)} rows, expected {n}")


def group_metrics(
    pred: np.ndarray,
    labels: np.ndarray,
    groups: dict[str, np.ndarray],
    *,
    binary: bool | None = None,
) -> list[GroupMetrics]:
    """Accuracy (and, for binary tasks with positive class 1, TPR and FPR) per group.

    `pred` are predicted class indices, `groups` maps a column name to its value per row
    (values are compared as strings). `binary` defaults to "only classes 0 and 1 occur".
    """
    p = np.asarray(pred, dtype=np.int64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    _check_inputs(y, groups, p)
    is_binary = _is_binary(p, y) if binary is None else binary
    out: list[GroupMetrics] = []
    for column in sorted(groups):
        for g, rows in _group_rows(np.asarray(groups[column])):
            pg, yg = p[rows], y[rows]
            tpr = fpr = None
            if is_binary:
                tpr = _rate(pg[yg == 1] == 1)
                fpr = _rate(pg[yg == 0] == 1)
            out.append(GroupMetrics(g, column, len(rows), float(np.mean(pg == yg)), tpr, fpr))
    return out


def mcnemar_z(right_before: np.ndarray, right_after: np.ndarray) -> float:
    """Continuity-corrected McNemar z for "worse after" (positive = more rows lost)."""
    b = int(np.count_nonzero(right_before & ~right_after))
    c = int(np.count_nonzero(~right_before & right_after))
    if b + c == 0:
        return 0.0
    return (b - c - 1) / math.sqrt(b + c)


@dataclass
class FairnessCheck:
    """Per-group metrics before/after; `flagged` names each failing (group, metric)."""

    passed: bool
    flagged: list[dict[str, Any]]  # {column, group, metric, before, after, drop, n, z}
    before: list[GroupMetrics]
    after: list[GroupMetrics]
    threshold: float
    min_group_size: int
    z_required: float = 0.0  # the Bonferroni-corrected z a drop had to exceed
    comparisons: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "flagged": [dict(f) for f in self.flagged],
            "before": [g.to_dict() for g in self.before],
            "after": [g.to_dict() for g in self.after],
            "threshold": self.threshold,
            "min_group_size": self.min_group_size,
            "z_required": self.z_required,
            "comparisons": self.comparisons,
        }

    @property
    def flagged_groups(self) -> dict[str, set[str]]:
        """Column -> the group values that failed (the input to `group_weights`)."""
        out: dict[str, set[str]] = {}
        for f in self.flagged:
            out.setdefault(str(f["column"]), set()).add(str(f["group"]))
        return out


def fairness_check(
    pred_before: np.ndarray,
    pred_after: np.ndarray,
    labels: np.ndarray,
    groups: dict[str, np.ndarray],
    *,
    threshold: float = 0.05,
    min_group_size: int = 30,
    z: float = 2.0,
) -> FairnessCheck:
    """Flag groups whose accuracy or TPR drops by > threshold, significantly (see module)."""
    pb = np.asarray(pred_before, dtype=np.int64).reshape(-1)
    pa = np.asarray(pred_after, dtype=np.int64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    _check_inputs(y, groups, pb, pa)
    binary = _is_binary(np.concatenate([pb, pa]), y)
    before = group_metrics(pb, y, groups, binary=binary)
    after = group_metrics(pa, y, groups, binary=binary)
    right_b, right_a = pb == y, pa == y
    # Every (column, group, metric) that is large enough to judge, then one corrected bar.
    tests: list[tuple[str, str, str, int, np.ndarray]] = []
    for column in sorted(groups):
        for g, rows in _group_rows(np.asarray(groups[column])):
            if len(rows) < min_group_size:
                continue
            tests.append((column, g, "accuracy", len(rows), rows))
            positives = rows[y[rows] == 1]
            if binary and len(positives):
                tests.append((column, g, "tpr", len(rows), positives))
    z_required = _bonferroni_z(z, len(tests))
    flagged: list[dict[str, Any]] = []
    for column, g, metric, n_group, r in tests:
        m_before = float(right_b[r].mean())
        m_after = float(right_a[r].mean())
        drop = m_before - m_after
        stat = mcnemar_z(right_b[r], right_a[r])
        if drop > threshold and stat > z_required:
            flagged.append(
                {
                    "column": column,
                    "group": g,
                    "metric": metric,
                    "before": m_before,
                    "after": m_after,
                    "drop": drop,
                    "n": n_group,
                    "z": stat,
                }
            )
    return FairnessCheck(
        passed=not flagged,
        flagged=flagged,
        before=before,
        after=after,
        threshold=threshold,
        min_group_size=min_group_size,
        z_required=z_required,
        comparisons=len(tests),
    )


def _bonferroni_z(z: float, m: int) -> float:
    """The one-sided z whose tail is that of `z` split over `m` comparisons."""
    if m <= 1:
        return z
    normal = NormalDist()
    return normal.inv_cdf(1.0 - (1.0 - normal.cdf(z)) / m)


def group_weights(groups: np.ndarray, flagged: set[str], *, max_ratio: float = 10.0) -> np.ndarray:
    """Per-row training weights (N,) that upweight the flagged groups; mean weight 1.

    Raw weight r = max(1, N / (G * n_g)) for rows of a flagged group g (N rows, G distinct
    groups, n_g rows in g), 1 for all other rows; the weights are r / mean(r). A flagged
    group thus carries at least its balanced share (N / G rows' worth) of the loss, the
    usual inverse-frequency weight, and is never downweighted. `max_ratio` caps r so a
    handful of rows cannot dominate training. Values are compared as strings.
    """
    keys = np.array([str(v) for v in np.asarray(groups).reshape(-1)], dtype=object)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    names, counts = np.unique(keys.astype(str), return_counts=True)
    size = dict(zip(names.tolist(), counts.tolist(), strict=True))
    r = np.ones(n, dtype=np.float64)
    for g in flagged:
        n_g = size.get(str(g), 0)
        if n_g:
            r[keys == str(g)] = min(max_ratio, max(1.0, n / (len(names) * n_g)))
    out: np.ndarray = r / r.mean()
    return out
