"""A verification report as the dashboard shows it: its checks in one line each, and
the charts its numbers can draw."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.dashboard import charts
from app.models import MLModel, Report, RequestModel
from app.verification.service import check_status


@dataclass
class ReportView:
    id: str
    model: str
    candidate_version: int
    baseline_version: int | None
    passed: bool
    decision: str
    created_at: datetime
    job_id: str | None
    checks: list[CheckRow]
    charts: dict[str, charts.Figure]
    flagged: list[dict[str, Any]]
    request_ids: list[str] = field(default_factory=list)


@dataclass
class CheckRow:
    name: str
    passed: bool
    summary: str
    threshold: dict[str, Any]
    status: str = ""
    reason: str = ""
    power: str = ""  # the attack's power on the baseline, beside the verdict


def power_summary(check: dict[str, Any]) -> str:
    """The forgetting attack on the baseline (which still holds the forget set): did it
    find the forget set there, by how much."""
    m = check.get("metrics") if isinstance(check.get("metrics"), dict) else {}
    p = (m or {}).get("power")
    if not isinstance(p, dict):
        return ""
    has = p.get("has_power")
    if has is None:
        return "not measurable (no out-references)"
    parts = [
        f"baseline AUC {_fmt(p.get('baseline_auc'))} vs reference {_fmt(p.get('reference_auc'))}"
    ]
    if p.get("baseline_lira_auc") is not None:
        parts.append(f"LiRA {_fmt(p.get('baseline_lira_auc'))} vs {_fmt(p.get('lira_threshold'))}")
    return ("has power: " if has else "no power: ") + ", ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def check_summary(name: str, check: dict[str, Any]) -> str:
    """One line of the numbers that decided a check."""
    m = check.get("metrics") if isinstance(check.get("metrics"), dict) else {}
    assert isinstance(m, dict)
    if name == "utility" and "candidate_accuracy" in m:
        return (
            f"accuracy {_fmt(m.get('baseline_accuracy'))} → {_fmt(m.get('candidate_accuracy'))}"
            f" (drop {_fmt(m.get('drop'))})"
        )
    if name == "forgetting":
        cand, ref = m.get("candidate") or {}, m.get("reference") or {}
        parts = [f"attack AUC {_fmt(cand.get('auc'))}"] if cand else []
        if ref:
            parts.append(f"reference {_fmt(ref.get('auc'))}")
        if m.get("lira_auc") is not None:
            parts.append(f"LiRA AUC {_fmt(m.get('lira_auc'))}")
        rm = ((m.get("attacks") or {}).get("candidate") or {}).get("rmia") or {}
        if rm.get("auc") is not None:
            parts.append(
                f"RMIA AUC {_fmt(rm.get('auc'))}, TPR@0.1% {_fmt(rm.get('tpr_at_0.1pct_fpr'))}"
            )
        if m.get("note"):
            parts.append(str(m["note"]))
        return ", ".join(parts)
    if name == "fairness":
        flagged = m.get("flagged") or []
        if m.get("note"):
            return str(m["note"])
        if not flagged:
            return f"no group regressed ({len(m.get('after') or [])} groups)"
        return "flagged: " + ", ".join(
            f"{f.get('column')}={f.get('group')} {f.get('metric')} "
            f"{_fmt(f.get('before'))} → {_fmt(f.get('after'))}"
            for f in flagged
        )
    if name == "lineage":
        return (
            f"{m.get('present_in_manifests', '?')} forgotten record(s) in the candidate's manifests"
        )
    if name == "feature":
        after = m.get("after") or {}
        before = m.get("before") or {}
        return (
            f"max score change when flipped: {_fmt(before.get('max_abs_change', 'n/a'))} → "
            f"{_fmt(after.get('max_abs_change'))}"
        )
    if name == "injection":
        return ", ".join(
            f"{k}: {_fmt(v)}" for k, v in m.items() if k in ("residual", "strategy", "note")
        )
    return ", ".join(
        f"{k}: {_fmt(v)}" for k, v in list(m.items())[:4] if not isinstance(v, list | dict)
    )


def report_view(session: Session, report_id: str, suffix: str = "") -> ReportView:
    report = session.get(Report, report_id) if len(report_id) <= 64 else None
    if report is None:
        raise NotFound(f"no report {report_id!r}", code="report_not_found")
    model = session.get(MLModel, report.model_id)
    checks = dict(report.checks or {})
    fair = checks.get("fairness") if isinstance(checks.get("fairness"), dict) else None
    flagged = list(((fair or {}).get("metrics") or {}).get("flagged") or [])
    request_ids = list(
        session.scalars(
            select(RequestModel.request_id)
            .where(RequestModel.report_id == report.id)
            .order_by(RequestModel.id)
        )
    )
    return ReportView(
        id=report.id,
        model=model.name if model else report.model_id,
        candidate_version=report.candidate_version,
        baseline_version=report.baseline_version,
        passed=report.passed,
        decision=report.decision,
        created_at=report.created_at,
        job_id=report.job_id,
        checks=[
            CheckRow(
                name=name,
                passed=check_status(c) == "pass",
                summary=check_summary(name, c),
                threshold={
                    k: v for k, v in dict(c.get("threshold") or {}).items() if k != "power_rule"
                },
                status=check_status(c),
                reason=str(c.get("reason") or ""),
                power=power_summary(c) if name == "forgetting" else "",
            )
            for name, c in checks.items()
            if isinstance(c, dict)
        ],
        charts=charts.report_charts(checks, suffix),
        flagged=[f for f in flagged if isinstance(f, dict)],
        request_ids=request_ids,
    )


@dataclass
class CandidateRow:
    """One candidate made for a request (the first unlearned one, a fallback retrain,
    each mitigation tried), side by side on the review page."""

    report_id: str
    model: str
    version: int
    method: str
    decision: str
    statuses: dict[str, str]
    accuracy: float | None
    groups: list[dict[str, Any]]  # per group: accuracy / TPR / FPR before -> after
    flagged: list[str]
    wall_seconds: float | None


def _groups(fair: dict[str, Any]) -> list[dict[str, Any]]:
    m = fair.get("metrics") if isinstance(fair.get("metrics"), dict) else {}
    before = {
        (g.get("column"), g.get("group")): g
        for g in (m or {}).get("before") or []
        if isinstance(g, dict)
    }
    out = []
    for g in (m or {}).get("after") or []:
        if not isinstance(g, dict):
            continue
        b = before.get((g.get("column"), g.get("group")), {})
        out.append(
            {
                "group": f"{g.get('column')}={g.get('group')}",
                **{
                    f"{k}_{when}": src.get(k)
                    for k in ("accuracy", "tpr", "fpr")
                    for when, src in (("before", b), ("after", g))
                },
            }
        )
    return out


def candidate_rows(session: Session, model_id: str, since: datetime) -> list[CandidateRow]:
    """Every report on the model since `since` (the request's arrival), oldest first."""
    from app.models import Job

    model = session.get(MLModel, model_id)
    rows = []
    for r in session.scalars(
        select(Report)
        .where(Report.model_id == model_id, Report.created_at >= since)
        .order_by(Report.created_at)
    ):
        job = session.get(Job, r.job_id) if r.job_id else None
        result = dict((job.result or {}) if job else {})
        mit = (result.get("unlearning") or {}).get("mitigation") or {}
        checks = dict(r.checks or {})
        util = (checks.get("utility") or {}).get("metrics") or {}
        fair = checks.get("fairness") if isinstance(checks.get("fairness"), dict) else {}
        flagged = (((fair or {}).get("metrics") or {}).get("flagged")) or []
        rows.append(
            CandidateRow(
                report_id=r.id,
                model=model.name if model else model_id,
                version=r.candidate_version,
                method=(
                    f"mitigation: {mit.get('kind', 'reweight')}"
                    if mit
                    else str(result.get("method") or (job.kind if job else ""))
                ),
                decision=r.decision,
                statuses={k: check_status(c) for k, c in checks.items() if isinstance(c, dict)},
                accuracy=util.get("candidate_accuracy") if isinstance(util, dict) else None,
                groups=_groups(fair or {}),
                flagged=[
                    f"{f.get('column')}={f.get('group')} {f.get('metric')}"
                    for f in flagged
                    if isinstance(f, dict)
                ],
                wall_seconds=((job.cost or {}).get("wall_seconds") if job else None),
            )
        )
    return rows
