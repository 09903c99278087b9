"""The resume sweep (run by beat): hand out again the work whose worker or message was
lost. Safe to run any time, on any number of beats: every task it sends is idempotent,
and a job that runs on a live worker is left alone.

- a `running` job whose heartbeat is older than its lease: its worker died (SIGKILL,
  a lost machine) or was cut off. It goes back to `pending` with its attempts kept,
  the model lock it held is released, the takeover is recorded on the job and in the
  audit log, and its task is sent again;
- a `pending` job older than the grace period whose message may be gone (a broker
  restart, a send that failed after commit), unless batching still holds it;
- a request still `received` (planning) or `erasing` after the grace period (those to
  plan are sent together, as `palimpsest.plan_requests` tasks).

Pending work is re-sent only while its queue is empty. With a backlog, work waits for
minutes as a matter of course, and its message is most likely still queued: re-sending
every minute would pile duplicates onto the backlog (each a no-op, but each read and
acknowledged). Once the queue drains, whatever is still pending has lost its message.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.core.broker import queue_depth
from app.core.db import enqueue
from app.core.settings import get_settings
from app.jobs import lease, routing
from app.jobs import service as jobs
from app.models import DeletionRequest, Job
from app.models.base import utcnow

log = logging.getLogger(__name__)

ACTOR = "beat"


def take_over_stale(session: Session) -> list[str]:
    """Running jobs whose lease expired: back to pending and re-sent. Their ids."""
    settings = get_settings()
    now = utcnow()
    # The shorter lease first, in SQL; a job waiting for its shards is checked below.
    cutoff = now - timedelta(seconds=settings.job_lease_seconds)
    candidates = session.scalars(
        select(Job)
        .where(
            Job.status == "running",
            or_(
                Job.heartbeat_at < cutoff,
                Job.heartbeat_at.is_(None) & (Job.started_at < cutoff),
            ),
        )
        .order_by(Job.created_at)
        # Another sweep (or the job's own conclusion) holding the row: not ours to take.
        .with_for_update(skip_locked=True)
    ).all()
    taken: list[str] = []
    for job in candidates:
        if not lease.is_stale(job, now):
            continue
        last = job.heartbeat_at or job.started_at
        age = (now - last).total_seconds() if last else None
        jobs.take_over(
            session,
            job,
            ACTOR,
            f"no heartbeat for {age:.0f} s" if age is not None else "no heartbeat",
        )
        routing.send(session, job)
        taken.append(job.id)
    return taken


def _backlog() -> dict[str, int] | None:
    """Messages waiting per queue; None when the broker cannot say (then re-send)."""
    try:
        return queue_depth(get_settings().broker_url)
    except Exception as exc:
        log.warning("queue depth unavailable, re-sending regardless: %s", type(exc).__name__)
        return None


def resume(session: Session, older_than_seconds: float | None = None) -> dict[str, int]:
    """The whole sweep; counts of what it re-sent (`deferred`: queues with a backlog,
    whose pending work was left to its queued messages)."""
    settings = get_settings()
    grace = settings.resume_after_seconds if older_than_seconds is None else older_than_seconds
    now = utcnow()
    cutoff = now - timedelta(seconds=grace)
    taken = take_over_stale(session)
    counts = {"taken_over": len(taken), "jobs": 0, "requests": 0, "deferred": 0}
    backlog = _backlog() or {}
    busy = {q for q, n in backlog.items() if n}
    counts["deferred"] += int("gpu" in busy)
    for job in session.scalars(
        select(Job).where(
            Job.status == "pending",
            Job.created_at < cutoff,
            # Held by batching (even past its time): the release sweep owns it, and
            # the worker leaves a job alone until that sweep clears the hold.
            Job.not_before.is_(None),
            Job.id.not_in(taken),
        )
    ):
        if routing.task_for(job.kind, job.method)[1] in busy:
            continue  # its message is most likely still queued
        routing.send(session, job)
        counts["jobs"] += 1
    if backlog.get("default", 0):
        counts["deferred"] += 1
        return counts
    for req in session.scalars(
        select(DeletionRequest).where(
            DeletionRequest.status.in_(("received", "erasing")),
            DeletionRequest.received_at < cutoff,
        )
    ):
        if req.status == "received":
            # Sent as `palimpsest.plan_requests` batches (the outbox merges them).
            enqueue(session, "palimpsest.plan_request", req.id, batch="palimpsest.plan_requests")
        else:
            enqueue(session, "palimpsest.erase_request", req.id)
        counts["requests"] += 1
    return counts
