"""Feature checks for text, image and audio columns.

Words (a request with `tokens`): every test row is scored with the words removed from
its text and with them inserted (the words appended, in mixed case, and the row's own
text as it is); a model blind to them gives exactly the same scores: `max_abs_change`
must be 0. The gap between rows whose text held the words and the others is reported
before and after, like the feature flip's.

A whole media column: each test row is scored with its own value and with other rows'
values (a handful of them); a model that no longer reads the column gives exactly 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from app.ml.data import TabularData
from app.ml.sisa import SisaEnsemble
from app.verification.service import Check

FLIP_VALUES = 4


def _cells(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _scores(
    ensemble: SisaEnsemble, test: TabularData, column: str, values: np.ndarray
) -> torch.Tensor:
    return ensemble.predict_proba({**test.columns, column: values})[:, -1]


def strip_words(text: str, tokens: Sequence[str]) -> str:
    pattern = r"\b(?:" + "|".join(re.escape(t) for t in tokens) + r")\b"
    return re.sub(pattern, " ", text, flags=re.IGNORECASE | re.UNICODE)


def token_summary(
    ensemble: SisaEnsemble, test: TabularData, column: str, tokens: Sequence[str]
) -> dict[str, Any]:
    texts = ["" if v is None else str(v) for v in test.columns[column]]
    removed = [strip_words(t, tokens) for t in texts]
    inserted = [
        f"{r} {' '.join(w.upper() if i % 2 else w for i, w in enumerate(tokens))}" for r in removed
    ]
    base = _scores(ensemble, test, column, _cells(removed))
    changes = [
        (_scores(ensemble, test, column, _cells(variant)) - base).abs()
        for variant in (inserted, texts)
    ]
    diff = torch.stack(changes).amax(dim=0)
    own = _scores(ensemble, test, column, _cells(texts))
    held = np.asarray([strip_words(t, tokens) != t for t in texts], dtype=bool)
    mask = torch.from_numpy(held)
    gap = float(own[mask].mean() - own[~mask].mean()) if held.any() and (~held).any() else 0.0
    return {
        "max_abs_change": float(diff.max()) if len(diff) else 0.0,
        "mean_abs_change": float(diff.mean()) if len(diff) else 0.0,
        "rows_changed": int((diff > 0).sum()),
        "group_gap": gap,
        "n_with": int(held.sum()),
        "n_without": int((~held).sum()),
    }


def token_check(
    candidate: SisaEnsemble,
    baseline: SisaEnsemble | None,
    test: TabularData,
    column: str,
    tokens: Sequence[str],
) -> Check:
    """Every test row scores exactly the same with the words removed or inserted."""
    after = token_summary(candidate, test, column, tokens)
    metrics: dict[str, Any] = {
        "feature": column,
        "tokens": list(tokens),
        "test_rows": len(test),
        "after": after,
    }
    if baseline is not None:
        metrics["before"] = token_summary(baseline, test, column, tokens)
    return Check(
        passed=len(test) > 0 and after["max_abs_change"] == 0.0,
        metrics=metrics,
        threshold={"max_abs_change": 0.0},
    )


def column_summary(ensemble: SisaEnsemble, test: TabularData, column: str) -> dict[str, Any]:
    values = list(test.columns[column])
    if not values:
        return {"max_abs_change": 0.0, "mean_abs_change": 0.0, "values": 0}
    base = _scores(ensemble, test, column, _cells(values))
    picks = sorted(set(np.linspace(0, len(values) - 1, FLIP_VALUES).astype(int).tolist()))
    diffs = [
        (_scores(ensemble, test, column, _cells([values[i]] * len(values))) - base).abs()
        for i in picks
    ]
    d = torch.stack(diffs)
    return {
        "max_abs_change": float(d.max()),
        "mean_abs_change": float(d.mean()),
        "values": len(picks),
    }


def media_column_check(
    candidate: SisaEnsemble, baseline: SisaEnsemble | None, test: TabularData, column: str
) -> Check:
    after = column_summary(candidate, test, column)
    metrics: dict[str, Any] = {"feature": column, "test_rows": len(test), "after": after}
    if baseline is not None:
        metrics["before"] = column_summary(baseline, test, column)
    return Check(
        passed=after["max_abs_change"] == 0.0,
        metrics=metrics,
        threshold={"max_abs_change": 0.0},
    )
