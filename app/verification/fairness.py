"""The fairness check: per-group accuracy, TPR and FPR on the test rows, before and after."""

from __future__ import annotations

import numpy as np

from app.ml.data import TabularData
from app.ml.thresholds import decide
from app.ml.verify.fairness import fairness_check
from app.registry.artifacts import Predictor
from app.verification.service import Check


def fairness(
    candidate: Predictor,
    baseline: Predictor,
    test: TabularData,
    group_columns: list[str],
    *,
    threshold: float,
    min_group_size: int,
) -> Check:
    limits = {"max_drop": threshold, "min_group_size": min_group_size}
    columns = [c for c in group_columns if c in test.columns]
    if not columns or len(test) == 0:
        return Check(True, {"note": "the model has no group columns", "groups": []}, limits)
    # Decisions as the versions make them (per-group thresholds where a version has them).
    before = decide(baseline, baseline.predict_proba(test.columns), test.columns)
    after = decide(candidate, candidate.predict_proba(test.columns), test.columns)
    # Values compared as strings (numpy's str() of each, in one call).
    groups = {c: np.asarray(test.columns[c]).astype(str) for c in columns}
    result = fairness_check(
        before, after, test.labels, groups, threshold=threshold, min_group_size=min_group_size
    )
    metrics = result.to_dict()
    metrics.pop("passed", None)
    return Check(result.passed, metrics, limits)
