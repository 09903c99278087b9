"""`roc_summary` is `auc` and `tpr_at_fpr` from one sort: the very same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from app.ml.metrics import auc, roc_summary, tpr_at_fpr


@pytest.mark.parametrize("kind", ["continuous", "rounded", "few_levels"])
def test_one_sort_gives_the_same_auc_and_tprs_as_the_separate_metrics(kind: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(2, 400))
        s = rng.normal(size=n)
        if kind == "rounded":
            s = np.round(s, 1)  # many ties
        elif kind == "few_levels":
            s = rng.integers(0, 3, n).astype(np.float64)
        y = rng.random(n) < rng.random()
        area, tprs = roc_summary(s, y, (0.01, 0.001))
        expected = [auc(s, y), tpr_at_fpr(s, y, 0.01), tpr_at_fpr(s, y, 0.001)]
        assert np.array_equal([area, *tprs], expected, equal_nan=True)


def test_perfect_and_inverted_separation() -> None:
    y = np.array([True] * 5 + [False] * 5)
    s = np.arange(10, 0, -1, dtype=np.float64)
    assert roc_summary(s, y, (0.01,)) == (1.0, [1.0])
    assert roc_summary(-s, y, (0.01,)) == (0.0, [0.0])
