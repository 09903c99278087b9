"""Jobs: creation, the per-model lock, progress and completion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import NotFound
from app.jobs.schemas import JobCost, JobOut
from app.models import Job, MLModel, RequestModel
from app.models.base import utcnow


def get(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return job


def to_out(session: Session, job: Job) -> JobOut:
    model = session.get(MLModel, job.model_id)
    request_ids = session.scalars(
        select(RequestModel.request_id)
        .where(RequestModel.job_id == job.id)
        .order_by(RequestModel.id)
    ).all()
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        progress=round(job.progress, 4),
        model=model.name if model else "",
        request_ids=list(request_ids),
        method=job.method,
        started_at=job.started_at,
        finished_at=job.finished_at,
        cost=JobCost(**{k: job.cost.get(k) for k in JobCost.model_fields}),
        report_id=job.report_id,
        result=job.result,
        error=job.error,
        not_before=job.not_before,
    )


def try_lock(session: Session, model_id: str, job_id: str) -> bool:
    """Take the model's lock for this job (re-entrant). Jobs on one model are serialised."""
    res = session.execute(
        update(MLModel)
        .where(MLModel.id == model_id)
        .where(or_(MLModel.locked_by_job.is_(None), MLModel.locked_by_job == job_id))
        .values(locked_by_job=job_id)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def unlock(session: Session, model_id: str, job_id: str) -> None:
    session.execute(
        update(MLModel)
        .where(MLModel.id == model_id, MLModel.locked_by_job == job_id)
        .values(locked_by_job=None)
    )


def start(session: Session, job: Job) -> None:
    job.status = "running"
    job.started_at = job.started_at or utcnow()
    job.attempts += 1
    job.error = None


def finish(session: Session, job: Job, *, ok: bool, error: str | None = None, **cost: Any) -> None:
    job.status = "succeeded" if ok else "failed"
    job.finished_at = utcnow()
    job.progress = 1.0 if ok else job.progress
    job.error = error
    job.cost = {**job.cost, **cost}


class ProgressReporter:
    """Writes progress in its own short transactions, at most every `interval` seconds,
    so the API and dashboard see it while the job's own work is uncommitted."""

    def __init__(
        self, job_id: str, lo: float = 0.0, hi: float = 1.0, interval: float = 0.5
    ) -> None:
        self.job_id = job_id
        self.lo, self.hi = lo, hi
        self.interval = interval
        self._last = 0.0

    def sub(self, lo: float, hi: float) -> ProgressReporter:
        span = self.hi - self.lo
        return ProgressReporter(
            self.job_id, self.lo + span * lo, self.lo + span * hi, self.interval
        )

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and fraction < 1.0:
            return
        self._last = now
        value = self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0)
        with session_scope() as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.progress < value)
                .values(progress=value)
            )


ProgressFn = Callable[[float], None]
