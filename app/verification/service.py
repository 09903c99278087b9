"""Verification of a candidate version before it may serve: a report, then a decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.ml.data import TabularData
from app.ml.metrics import accuracy
from app.ml.sisa import SisaManifest
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


def decide(checks: dict[str, Check]) -> tuple[bool, str]:
    """All pass -> promote. Forgetting fails -> retrain. Utility/fairness -> review."""
    passed = all(c.passed for c in checks.values())
    if passed:
        return True, "promote"
    if (
        not checks.get("lineage", Check(True, {})).passed
        or not checks.get("forgetting", Check(True, {})).passed
    ):
        return False, "retrain"
    return False, "needs_review"


def save_report(
    session: Session,
    model: MLModel,
    job_id: str,
    candidate: int,
    baseline: int | None,
    checks: dict[str, Check],
) -> Report:
    passed, decision = decide(checks)
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
