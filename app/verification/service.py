"""Verification of a candidate version before it may serve: a report, then a decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.ml.data import TabularData
from app.ml.features import flip_test
from app.ml.metrics import accuracy
from app.ml.sisa import SisaEnsemble, SisaManifest
from app.models import MLModel, Report
from app.registry.artifacts import Predictor
from app.verification.schemas import ReportOut


@dataclass
class Check:
    passed: bool
    metrics: dict[str, Any]
    threshold: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": self.metrics, "threshold": self.threshold}


def lineage_check(candidate: SisaManifest, forgotten_ids: np.ndarray) -> Check:
    """Exact methods: no training manifest of the candidate holds a forgotten record."""
    present = sorted(candidate.shards_containing(int(i) for i in forgotten_ids))
    n_present = sum(
        int(np.isin(np.asarray(e.record_ids, dtype=np.int64), forgotten_ids).sum())
        for e in candidate.entries
    )
    return Check(
        passed=n_present == 0,
        metrics={
            "forgotten_records": len(forgotten_ids),
            "present_in_manifests": n_present,
            "shards": present,
        },
        threshold={"present_in_manifests": 0},
    )


def utility_check(
    candidate: Predictor, baseline: Predictor | None, test: TabularData, max_drop: float
) -> Check:
    """Test accuracy of the candidate against the current version on the same rows."""
    if len(test) == 0:
        return Check(True, {"test_rows": 0, "note": "no test rows left"}, {"max_drop": max_drop})
    cand = accuracy(candidate.predict_proba(test.columns), test.labels)
    base = accuracy(baseline.predict_proba(test.columns), test.labels) if baseline else cand
    drop = base - cand
    return Check(
        passed=drop <= max_drop + 1e-12,
        metrics={
            "candidate_accuracy": cand,
            "baseline_accuracy": base,
            "drop": drop,
            "test_rows": len(test),
        },
        threshold={"max_drop": max_drop},
    )


def _flip_values(ensemble: SisaEnsemble, test: TabularData, feature: str) -> list[object]:
    """A categorical's vocabulary (union over shards), or a numeric feature's distinct
    test values (its quartiles when there are more than 10)."""
    vocab: list[object] = []
    for prep in ensemble.preprocessors.values():
        for name, values in prep.categorical:
            if name == feature:
                vocab.extend(v for v in values if v not in vocab)
    if vocab:
        return vocab
    col = np.asarray(test.columns[feature], dtype=np.float64)
    col = col[np.isfinite(col)]
    distinct = np.unique(col)
    if len(distinct) > 10:
        distinct = np.unique(np.quantile(col, [0.0, 0.25, 0.5, 0.75, 1.0]))
    return [float(v) for v in distinct]


def flip_summary(ensemble: SisaEnsemble, test: TabularData, feature: str) -> dict[str, Any]:
    """The worst score change over shards when `feature` is flipped, and the score gap
    between rows holding the first value and the others (mean over shards)."""
    values = _flip_values(ensemble, test, feature)
    if not values or len(test) == 0:
        return {"max_abs_change": 0.0, "mean_abs_change": 0.0, "group_gap": 0.0, "values": 0}
    results = [
        flip_test(
            ensemble.models[s],
            ensemble.preprocessors[s],
            test.columns,
            feature,
            values[0],
            values=values,
        )
        for s in ensemble.shards
    ]
    return {
        "max_abs_change": max(r.max_abs_change for r in results),
        "mean_abs_change": float(np.mean([r.mean_abs_change for r in results])),
        "group_gap": float(np.mean([r.group_gap for r in results])),
        "value": str(values[0]),
        "values": len(values),
    }


def feature_check(
    candidate: SisaEnsemble, baseline: SisaEnsemble | None, test: TabularData, feature: str
) -> Check:
    """Feature requests: flipping the feature must change no score at all (structural
    removal), on the held-out rows."""
    after = flip_summary(candidate, test, feature)
    metrics: dict[str, Any] = {"feature": feature, "test_rows": len(test), "after": after}
    if baseline is not None:
        metrics["before"] = flip_summary(baseline, test, feature)
    return Check(
        passed=after["max_abs_change"] == 0.0,
        metrics=metrics,
        threshold={"max_abs_change": 0.0},
    )


def decide(checks: dict[str, Check], approximate: bool = False) -> tuple[bool, str]:
    """All pass -> promote. Forgetting (or lineage, or a feature still used) fails ->
    retrain. Utility/fairness -> review, except after an approximate method, where the
    exact fallback is tried first."""
    passed = all(c.passed for c in checks.values())
    if passed:
        return True, "promote"
    if any(not checks.get(k, Check(True, {})).passed for k in ("lineage", "feature")):
        return False, "retrain"
    if any(not checks.get(k, Check(True, {})).passed for k in ("forgetting", "injection")):
        # After an approximate method, exact retraining is the remedy. After an exact one
        # (its lineage check passed) a retrain would rebuild the very same model: the
        # attack is seeing something else (the forget set's population), a person decides.
        return False, "retrain" if approximate else "needs_review"
    if approximate and not checks.get("utility", Check(True, {})).passed:
        return False, "retrain"
    return False, "needs_review"


def save_report(
    session: Session,
    model: MLModel,
    job_id: str,
    candidate: int,
    baseline: int | None,
    checks: dict[str, Check],
    *,
    approximate: bool = False,
    allow_retrain: bool = True,
) -> Report:
    passed, decision = decide(checks, approximate)
    if decision == "retrain" and not allow_retrain:
        decision = "needs_review"  # a retrain's own report: no loop, a person decides
    if decision == "promote" and model.config.get("verification", {}).get("require_approval"):
        decision = "approval_required"  # every check passed; the model wants a person too
    report = Report(
        model_id=model.id,
        job_id=job_id,
        candidate_version=candidate,
        baseline_version=baseline,
        passed=passed,
        decision=decision,
        checks={k: c.to_dict() for k, c in checks.items()},
    )
    session.add(report)
    session.flush()
    return report


def get(session: Session, report_id: str) -> Report:
    report = session.get(Report, report_id)
    if report is None:
        raise NotFound(f"no report {report_id!r}", code="report_not_found")
    return report


def to_out(session: Session, report: Report) -> ReportOut:
    model = session.get(MLModel, report.model_id)
    return ReportOut(
        id=report.id,
        model=model.name if model else "",
        candidate_version=report.candidate_version,
        baseline_version=report.baseline_version,
        passed=report.passed,
        decision=report.decision,
        checks=report.checks,
        created_at=report.created_at,
        job_id=report.job_id,
    )
