"""Verification of a candidate version before it may serve: a report, then a decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.ml.data import TabularData
from app.ml.features import flip_test
from app.ml.sisa import SisaEnsemble, SisaManifest
from app.ml.thresholds import decide as decide_labels
from app.models import MLModel, Report
from app.registry.artifacts import Predictor
from app.verification.schemas import ReportOut

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
STATUSES = (PASS, FAIL, INCONCLUSIVE)


@dataclass
class Check:
    """One check of a report. `status` is `pass`, `fail` or `inconclusive` (the check
    could not tell, e.g. an attack with no power even on the baseline); `passed` is true
    only for `pass`. `Check(True/False, ...)` sets the status from `passed`;
    `Check.inconclusive(...)` makes one that could not tell. `reason` says why, in words.
    """

    passed: bool
    metrics: dict[str, Any]
    threshold: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.status:
            self.status = PASS if self.passed else FAIL
        if self.status not in STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")
        self.passed = self.status == PASS

    @classmethod
    def inconclusive(
        cls, metrics: dict[str, Any], threshold: dict[str, Any] | None = None, *, reason: str
    ) -> Check:
        return cls(False, metrics, threshold or {}, status=INCONCLUSIVE, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "status": self.status,
            "reason": self.reason,
            "metrics": self.metrics,
            "threshold": self.threshold,
        }


def check_status(c: Any) -> str:
    """The status of a stored check (a dict); reports from before statuses existed say
    only `passed`."""
    if not isinstance(c, dict):
        return FAIL
    status = c.get("status")
    if status in STATUSES:
        return str(status)
    return PASS if c.get("passed") else FAIL


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


def _accuracy(predictor: Predictor, test: TabularData) -> float:
    """Test accuracy of the predictor's decisions (its per-group thresholds, if any)."""
    labels = decide_labels(predictor, predictor.predict_proba(test.columns), test.columns)
    return float(np.mean(labels == np.asarray(test.labels)))


def utility_check(
    candidate: Predictor, baseline: Predictor | None, test: TabularData, max_drop: float
) -> Check:
    """Test accuracy of the candidate against the current version on the same rows."""
    if len(test) == 0:
        return Check(True, {"test_rows": 0, "note": "no test rows left"}, {"max_drop": max_drop})
    cand = _accuracy(candidate, test)
    base = _accuracy(baseline, test) if baseline else cand
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


def _status(checks: dict[str, Check], name: str) -> str:
    c = checks.get(name)
    return PASS if c is None else c.status


def decide(
    checks: dict[str, Check], approximate: bool = False, *, accept_inconclusive: bool = False
) -> tuple[bool, str]:
    """All pass -> promote. Forgetting (or lineage, or a feature still used) fails ->
    retrain. Utility/fairness -> review, except after an approximate method, where the
    exact fallback is tried first.

    An inconclusive forgetting check (no attack power on the baseline) proves nothing
    either way: after an exact method the lineage proof decides (a passed lineage check
    covers it); after an approximate one the exact fallback is due unless the model's
    policy accepts it (`accept_inconclusive`). Other inconclusive checks (a utility or
    fairness check with nothing to measure, an injection test that could not be set up)
    cannot show a regression and do not hold a candidate back. The report's `passed` is
    true when no check failed and every inconclusive forgetting check is covered."""
    if any(_status(checks, k) != PASS for k in ("lineage", "feature") if k in checks):
        return False, "retrain"
    forgetting = _status(checks, "forgetting")
    if forgetting == INCONCLUSIVE:
        covered = (
            accept_inconclusive if approximate else ("lineage" in checks)
        )  # lineage passed (checked above)
        if not covered:
            return False, "retrain" if approximate else "needs_review"
    failed = [k for k, c in checks.items() if c.status == FAIL]
    if not failed:
        return True, "promote"
    if any(k in failed for k in ("forgetting", "injection")):
        # After an approximate method, exact retraining is the remedy. After an exact one
        # (its lineage check passed) a retrain would rebuild the very same model: the
        # attack is seeing something else (the forget set's population), a person decides.
        return False, "retrain" if approximate else "needs_review"
    if approximate and "utility" in failed:
        return False, "retrain"
    return False, "needs_review"


def explain_inconclusive(checks: dict[str, Check], approximate: bool, accepted: bool) -> None:
    """Say in the forgetting check's reason what decides instead of it."""
    c = checks.get("forgetting")
    if c is None or c.status != INCONCLUSIVE:
        return
    if not approximate and "lineage" in checks:
        then = (
            "the decision rests on the lineage proof (exact method: no training manifest "
            "of the candidate holds a forgotten record)"
        )
        c.metrics["decided_by"] = "lineage"
    elif approximate and accepted:
        then = "the model's policy accepts an inconclusive forgetting check for approximate methods"
        c.metrics["decided_by"] = "policy"
    elif approximate:
        then = "an approximate method cannot rest on it: the request falls back to exact retraining"
        c.metrics["decided_by"] = "retrain"
    else:
        then = "no lineage proof either: a person decides"
        c.metrics["decided_by"] = "review"
    c.reason = f"{c.reason}; {then}" if c.reason else then


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
    policy = model.config.get("verification", {}) or {}
    accept = bool(policy.get("accept_inconclusive_forgetting"))
    explain_inconclusive(checks, approximate, accept)
    passed, decision = decide(checks, approximate, accept_inconclusive=accept)
    if decision == "retrain" and not allow_retrain:
        decision = "needs_review"  # a retrain's own report: no loop, a person decides
    if decision == "promote" and policy.get("require_approval"):
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


def normalised_checks(checks: dict[str, Any] | None) -> dict[str, Any]:
    """Stored checks with `status` and `reason` on each (reports from before statuses
    existed carry only `passed`)."""
    out: dict[str, Any] = {}
    for name, c in (checks or {}).items():
        if isinstance(c, dict):
            c = {**c, "status": check_status(c), "reason": str(c.get("reason") or "")}
            c["passed"] = c["status"] == PASS
        out[name] = c
    return out


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
        checks=normalised_checks(report.checks),
        created_at=report.created_at,
        job_id=report.job_id,
    )
