"""Frozen per-group loss weights: a fairness mitigation that survives later unlearning.

A mitigation upweights the groups the fairness check flagged (`group_weights`). Weights
computed afresh from the data would depend on every record (group sizes, the mean), so
forgetting one record would change every record's weight and every shard's checkpoint
chain: exact unlearning would have to retrain everything. Instead the weights are frozen
when the mitigation is trained, as one factor per (column, group value) and a scale, and
every later training of that model (unlearning, fallback retraining) applies the same
table. Forgetting records then changes the weights of no other record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.ml.data import TabularData
from app.ml.verify.fairness import group_weights


@dataclass(frozen=True)
class GroupWeighting:
    """weight(record) = scale * prod over columns of factors[column].get(value, 1)."""

    factors: dict[str, dict[str, float]]
    scale: float = 1.0

    @classmethod
    def from_flagged(
        cls, data: TabularData, flagged: Mapping[str, set[str]], *, max_ratio: float = 10.0
    ) -> GroupWeighting | None:
        """Freeze the weights `group_weights` gives `data` for the flagged groups (a
        product over columns, renormalised to mean 1 on `data`); None if none apply."""
        factors: dict[str, dict[str, float]] = {}
        for column, groups in sorted(flagged.items()):
            if column not in data.columns or not groups or len(data) == 0:
                continue
            values = np.asarray([str(v) for v in data.columns[column]], dtype=object)
            w = group_weights(values, set(groups), max_ratio=max_ratio)
            table = {str(v): float(w[values == v][0]) for v in np.unique(values.astype(str))}
            factors[column] = table
        if not factors:
            return None
        raw = cls(factors=factors, scale=1.0).apply(data)
        return cls(factors=factors, scale=float(1.0 / raw.mean()))

    @classmethod
    def group_robust(
        cls,
        data: TabularData,
        losses: Mapping[str, Mapping[str, float]],
        *,
        eta: float = 2.0,
        max_ratio: float = 10.0,
    ) -> GroupWeighting | None:
        """Group DRO's weights, frozen: per (column, group) a factor exp(eta * (loss_g -
        min loss)) from the groups' mean losses under the current model (`losses`), capped
        at `max_ratio`, renormalised to mean 1 on `data`. This is the exponentiated-
        gradient step of group DRO (Sagawa et al., ICLR 2020) taken once, from the
        current model, and then held fixed through training, so that later exact
        unlearning replays the same weights (an online DRO's weights would depend on
        every record). None if no group has a loss."""
        factors: dict[str, dict[str, float]] = {}
        for column, by_group in sorted(losses.items()):
            if column not in data.columns or not by_group:
                continue
            low = min(by_group.values())
            factors[column] = {
                str(g): float(min(max_ratio, np.exp(eta * (loss - low))))
                for g, loss in sorted(by_group.items())
            }
        if not factors or len(data) == 0:
            return None
        raw = cls(factors=factors, scale=1.0).apply(data)
        return cls(factors=factors, scale=float(1.0 / raw.mean()))

    def apply(self, data: TabularData) -> np.ndarray:
        """Per-record weights (N,) aligned with `data`. A value not seen when the table
        was frozen (or a missing column) gets the factor of an unflagged group."""
        w = np.full(len(data), self.scale, dtype=np.float64)
        for column, table in self.factors.items():
            if column not in data.columns:
                continue
            baseline = min(table.values()) if table else 1.0
            values = [str(v) for v in data.columns[column]]
            w *= np.asarray([table.get(v, baseline) for v in values], dtype=np.float64)
        return w

    def to_dict(self) -> dict[str, Any]:
        return {"factors": {c: dict(t) for c, t in self.factors.items()}, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GroupWeighting | None:
        if not d:
            return None
        return cls(
            factors={
                str(c): {str(v): float(f) for v, f in t.items()} for c, t in d["factors"].items()
            },
            scale=float(d.get("scale", 1.0)),
        )
