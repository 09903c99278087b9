"""Rows shared by several dashboard pages: a deletion request and a job, as shown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import DeletionRequest, Job, MLModel, RequestModel
from app.requests import states

JOB_STATUSES = ("pending", "running", "succeeded", "failed")
ACTIVE_JOB = ("pending", "running")


@dataclass
class RequestRow:
    id: str
    kind: str
    status: str
    target: str
    received_at: datetime
    due_at: datetime
    completed_at: datetime | None
    seconds_left: float
    overdue: bool
    extended: bool
    n_records: int

    @property
    def open(self) -> bool:
        return self.status not in states.TERMINAL


def _target(req: DeletionRequest) -> str:
    """What a request erases, without personal data (a subject shows as its key prefix)."""
    if req.kind == "subject":
        return f"subject {(req.subject_key or '')[:12]}…"
    if req.kind == "records":
        return f"{len(req.record_ids or [])} record(s)"
    if req.kind == "source":
        return f"source {req.source}"
    return f"feature {req.feature} of {req.model_name}"


def request_row(req: DeletionRequest, now: datetime) -> RequestRow:
    open_ = req.status not in states.TERMINAL
    return RequestRow(
        id=req.id,
        kind=req.kind,
        status=req.status,
        target=_target(req),
        received_at=req.received_at,
        due_at=req.due_at,
        completed_at=req.completed_at,
        seconds_left=(req.due_at - now).total_seconds(),
        overdue=open_ and req.due_at <= now,
        extended=req.extended_at is not None,
        n_records=req.n_records,
    )


@dataclass
class JobRow:
    id: str
    kind: str
    status: str
    progress: float
    model: str
    method: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cost: dict[str, Any]
    error: str | None
    report_id: str | None
    request_ids: list[str] = field(default_factory=list)
    not_before: datetime | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> int:
        return round(100 * self.progress)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_JOB

    @property
    def saved_seconds(self) -> float | None:
        device = as_float(self.cost.get("device_seconds"))
        retrain = as_float(self.cost.get("retrain_estimate_seconds"))
        if device is None or retrain is None or self.kind == "train":
            return None
        return retrain - device

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": round(self.progress, 4),
            "percent": self.percent,
            "model": self.model,
            "method": self.method,
            "error": self.error,
            "report_id": self.report_id,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _model_names(session: Session, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    return dict(
        session.execute(select(MLModel.id, MLModel.name).where(MLModel.id.in_(ids))).tuples().all()
    )


def job_rows(session: Session, jobs: Sequence[Job]) -> list[JobRow]:
    names = _model_names(session, {j.model_id for j in jobs if j.model_id is not None})
    by_job: dict[str, list[str]] = {}
    ids = [j.id for j in jobs]
    if ids:
        for job_id, request_id in session.execute(
            select(RequestModel.job_id, RequestModel.request_id)
            .where(RequestModel.job_id.in_(ids))
            .order_by(RequestModel.id)
        ).tuples():
            if job_id is not None:
                by_job.setdefault(job_id, []).append(request_id)
    return [
        JobRow(
            id=j.id,
            kind=j.kind,
            status=j.status,
            progress=float(j.progress or 0.0),
            model=names.get(j.model_id, j.model_id) if j.model_id else str(j.dataset_id),
            method=j.method,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            cost=dict(j.cost or {}),
            error=j.error,
            report_id=j.report_id,
            request_ids=by_job.get(j.id, []),
            not_before=j.not_before,
            result=dict(j.result or {}),
        )
        for j in jobs
    ]
