"""Batching: when a pending unlearning job (a batch of planned requests) may start.

A job is *held* while `Job.not_before` is set: it has been created but not sent to the
workers. `schedule` sets or clears the hold whenever a request joins; the beat's
`release_due` sends held jobs whose time has come (the window has passed, the maximum
wait is over, or a request in it is near its legal deadline).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.jobs import routing
from app.jobs.schemas import BatchingIn
from app.models import DeletionRequest, Job, MLModel, RequestModel
from app.models.base import utcnow


def policy(config: dict[str, Any]) -> BatchingIn:
    """The model's batching settings (defaults for models created before they existed)."""
    return BatchingIn.model_validate(config.get("batching") or {})


def open_job(session: Session, model: MLModel) -> Job | None:
    """The pending unlearning job a new request on `model` joins, if it has room.

    Locked: a worker starting the job locks the same row, so a request joins either
    before the job reads its requests or not at all (then it opens the next job)."""
    job = session.scalars(
        select(Job)
        .where(
            Job.model_id == model.id,
            Job.kind == "unlearn",
            Job.status == "pending",
            Job.method != "feature",
        )
        .order_by(Job.created_at)
        .with_for_update()
    ).first()
    if job is None:
        return None
    cap = policy(model.config).max_batch
    if cap is not None and batch_size(session, job) >= cap:
        return None
    return job


def batch_size(session: Session, job: Job) -> int:
    return int(
        session.scalar(select(func.count(RequestModel.id)).where(RequestModel.job_id == job.id))
        or 0
    )


def release_time(session: Session, job: Job, model: MLModel) -> tuple[datetime, str]:
    """When `job` may start under its model's batching policy, and the rule that says so:
    `window` (a full batch waits out the window), `max_wait` (a batch below the minimum
    waits at most this long) or `deadline` (a request is due within the margin)."""
    rules = policy(model.config)
    first, earliest_due, n = session.execute(
        select(
            func.min(DeletionRequest.received_at),
            func.min(DeletionRequest.due_at),
            func.count(DeletionRequest.id),
        )
        .join(RequestModel, RequestModel.request_id == DeletionRequest.id)
        .where(RequestModel.job_id == job.id, DeletionRequest.status != "cancelled")
    ).one()
    start = first or job.created_at
    if n >= rules.min_batch:
        at, rule = start + timedelta(seconds=rules.window_seconds), "window"
    else:
        at, rule = start + timedelta(seconds=rules.max_wait_seconds), "max_wait"
    if earliest_due is not None:
        urgent = earliest_due - timedelta(hours=rules.deadline_margin_hours)
        if urgent < at:
            at, rule = urgent, "deadline"
    return at, rule


def schedule(session: Session, job: Job, model: MLModel, *, new: bool) -> None:
    """After a request joined `job` (or created it): hold it, or send it if its time has
    come. A job already sent (pending, not held) stays sent."""
    if not new and job.not_before is None:
        return
    at, rule = release_time(session, job, model)
    if at <= utcnow():
        _send(session, job, reason="immediate" if new and rule == "window" else rule)
    else:
        job.not_before = at


def _send(session: Session, job: Job, reason: str) -> None:
    held_since = job.not_before
    job.not_before = None
    routing.send(session, job)
    if held_since is not None or reason not in ("immediate", "window"):
        audit.record(
            session,
            actor="worker",
            action="job.released",
            entity_type="job",
            entity_id=job.id,
            data={"reason": reason, "requests": batch_size(session, job)},
        )


def release_due(session: Session, now: datetime | None = None) -> dict[str, int]:
    """Beat: send every held job whose release time has come. The time is recomputed, so
    a policy change or a deadline drawing near takes effect."""
    now = now or utcnow()
    held = session.scalars(
        select(Job)
        .where(Job.kind == "unlearn", Job.status == "pending", Job.not_before.is_not(None))
        .order_by(Job.created_at)
        .with_for_update(skip_locked=True)
    ).all()
    counts = {"released": 0, "held": 0}
    for job in held:
        model = session.get(MLModel, job.model_id)
        if model is None:
            continue
        at, rule = release_time(session, job, model)
        if at <= now:
            _send(session, job, reason=rule)
            counts["released"] += 1
        else:
            job.not_before = at
            counts["held"] += 1
    return counts


def reschedule_model(session: Session, model: MLModel) -> None:
    """After the model's policy changed: recompute the hold of its pending jobs, sending
    those whose time has now come."""
    held = session.scalars(
        select(Job).where(
            Job.model_id == model.id,
            Job.kind == "unlearn",
            Job.status == "pending",
            Job.not_before.is_not(None),
        )
    ).all()
    for job in held:
        at, rule = release_time(session, job, model)
        if at <= utcnow():
            _send(session, job, reason=rule)
        else:
            job.not_before = at
