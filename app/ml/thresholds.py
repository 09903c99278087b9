"""Per-group decision thresholds: a post-processing fairness mitigation.

The model's scores are left as they are; only the decision changes: a binary model
labels a row positive when its positive-class probability reaches its group's threshold
instead of 0.5 (Hardt et al.'s post-processing family). The thresholds are fitted on
retained rows after the model is trained and stored with the version; the fairness and
utility checks and `predict` decide with them. Membership scores (the forgetting check)
read the probabilities, which thresholds do not touch.

Post-processing, said plainly: it treats the symptom at the decision, not the model's
representation; it needs the group column at prediction time; and it is fitted on the
retained training rows (the rows there are), so its gain on unseen rows is what the
verification's test split shows, not what the fit reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GRID = np.linspace(0.05, 0.95, 91)


@dataclass(frozen=True)
class GroupThresholds:
    """Positive-class thresholds per value of one group column (default 0.5)."""

    column: str
    thresholds: dict[str, float]
    default: float = 0.5

    def labels(self, proba: torch.Tensor | np.ndarray, columns: Mapping[str, Any]) -> np.ndarray:
        """Class labels (N,) for binary `proba` (N, 2); rows whose group is unknown or
        absent use `default`."""
        p = proba.detach().cpu().numpy() if isinstance(proba, torch.Tensor) else np.asarray(proba)
        if p.ndim != 2 or p.shape[1] != 2:
            return np.asarray(p.argmax(axis=1), dtype=np.int64)
        if self.column not in columns:
            t = np.full(len(p), self.default)
        else:
            values = [str(v) for v in columns[self.column]]
            t = np.asarray([self.thresholds.get(v, self.default) for v in values])
        return np.asarray(p[:, 1] >= t, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "thresholds": dict(self.thresholds), "default": self.default}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GroupThresholds | None:
        if not d:
            return None
        return cls(
            column=str(d["column"]),
            thresholds={str(k): float(v) for k, v in d["thresholds"].items()},
            default=float(d.get("default", 0.5)),
        )


def fit_group_thresholds(
    proba: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    column: str,
    *,
    min_group_size: int = 30,
) -> GroupThresholds:
    """Per group, the threshold on the positive-class probability that maximises the
    group's accuracy on these rows (ties: the one closest to 0.5); groups smaller than
    `min_group_size` keep 0.5."""
    p = proba.detach().cpu().numpy() if isinstance(proba, torch.Tensor) else np.asarray(proba)
    p1 = p[:, 1] if p.ndim == 2 else p
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray([str(v) for v in groups], dtype=object)
    out: dict[str, float] = {}
    for value in sorted(set(g)):
        mask = g == value
        if int(mask.sum()) < min_group_size:
            continue
        acc = ((p1[mask][None, :] >= GRID[:, None]) == (y[mask][None, :] == 1)).mean(axis=1)
        best = np.flatnonzero(acc >= acc.max() - 1e-12)
        out[str(value)] = float(GRID[best[np.argmin(np.abs(GRID[best] - 0.5))]])
    return GroupThresholds(column=column, thresholds=out)


def decide(
    predictor: Any, proba: torch.Tensor | np.ndarray, columns: Mapping[str, Any]
) -> np.ndarray:
    """The predictor's decisions: its version's per-group thresholds when it has them
    (`predictor.manifest.thresholds`), the most probable class otherwise."""
    manifest = getattr(predictor, "manifest", None)
    table = GroupThresholds.from_dict(getattr(manifest, "thresholds", None))
    if table is not None:
        return table.labels(proba, columns)
    p = proba.detach().cpu().numpy() if isinstance(proba, torch.Tensor) else np.asarray(proba)
    return np.asarray(p.argmax(axis=1), dtype=np.int64)
