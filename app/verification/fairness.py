"""The fairness check: per-group accuracy, TPR and FPR on the test rows, before and after."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

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
    groups = {c: _as_str(test.columns[c]) for c in columns}
    result = fairness_check(
        before, after, test.labels, groups, threshold=threshold, min_group_size=min_group_size
    )
    metrics = result.to_dict()
    metrics.pop("passed", None)
    return Check(result.passed, metrics, limits)


# The string form of recent group columns: a warm worker hands out a model's test rows as
# the same arrays job after job, so each is converted once. An entry holds a weak
# reference to its array, so an id is never mistaken for a later array's.
_STRINGS: OrderedDict[int, tuple[weakref.ref[Any], np.ndarray]] = OrderedDict()
_STRINGS_SIZE = 16
_STRINGS_LOCK = threading.Lock()


def _as_str(values: Any) -> np.ndarray:
    if not isinstance(values, np.ndarray):
        return np.asarray(values).astype(str)
    with _STRINGS_LOCK:
        hit = _STRINGS.get(id(values))
        if hit is not None and hit[0]() is values:
            _STRINGS.move_to_end(id(values))
            return hit[1]
    out = values.astype(str)
    out.flags.writeable = False  # shared by every check that finds it
    with _STRINGS_LOCK:
        _STRINGS[id(values)] = (weakref.ref(values), out)
        while len(_STRINGS) > _STRINGS_SIZE:
            _STRINGS.popitem(last=False)
    return out
