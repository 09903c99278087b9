"""Jobs: creation, the per-model lock, progress and completion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import NotFound
from app.core.settings import get_settings
from app.integrations import openlineage
from app.jobs import lease
from app.jobs.schemas import JobCost, JobOut
from app.models import Job, MLModel, RequestModel
from app.models.base import utcnow


def get(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return job


def to_out(session: Session, job: Job) -> JobOut:
    model = session.get(MLModel, job.model_id) if job.model_id is not None else None
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
        dataset_id=job.dataset_id,
        request_ids=list(request_ids),
        method=job.method,
        started_at=job.started_at,
        finished_at=job.finished_at,
        cost=JobCost(**{k: job.cost.get(k) for k in JobCost.model_fields}),
        report_id=job.report_id,
        result=job.result,
        error=job.error,
        not_before=job.not_before,
        attempts=job.attempts,
        worker=job.worker,
        heartbeat_at=job.heartbeat_at,
    )


def request_ids(session: Session, job_id: str) -> list[str]:
    """The requests a job works for, sorted."""
    return sorted(
        set(session.scalars(select(RequestModel.request_id).where(RequestModel.job_id == job_id)))
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
    """A new execution of the job, in this process: it holds the lease from here on."""
    job.status = "running"
    job.started_at = job.started_at or utcnow()
    job.attempts += 1
    job.error = None
    job.progress = 0.0
    job.worker = lease.worker_id()
    job.heartbeat_at = utcnow()
    lease.bind(job.id, job.attempts)
    openlineage.job_started(session, job)  # emitted after commit, when configured


def take_over(session: Session, job: Job, actor: str, reason: str) -> None:
    """A running job whose worker is gone goes back to pending (its attempts kept), the
    model lock it held is released, and the takeover is recorded on the job and in the
    audit log. The caller hands it out again."""
    from app.audit import service as audit

    record = {"at": utcnow().isoformat(), "reason": reason, "by": actor, **lease.describe(job)}
    job.result = {**job.result, "takeovers": [*job.result.get("takeovers", []), record]}
    job.status = "pending"
    job.worker = None
    job.heartbeat_at = None
    if job.model_id is not None:
        unlock(session, job.model_id, job.id)
    audit.record(
        session,
        actor=actor,
        action="job.taken_over",
        entity_type="job",
        entity_id=job.id,
        data={"kind": job.kind, **record},
    )


def claim(session: Session, job_id: str, token: int | None) -> Job:
    """The job, locked for this transaction, if this execution (attempt `token`) still
    owns it; LeaseLost otherwise. Every transaction that concludes a job begins here, so
    a job taken over by another worker is concluded once, by its current owner."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or (token is not None and not lease.owned(job, token)):
        raise lease.LeaseLost(f"job {job_id}: attempt {token} no longer owns it")
    return job


def release(job_id: str, token: int | None, error: str) -> None:
    """A failed attempt that will be retried: the job goes back to pending (its model
    lock kept), so that the retry, on whichever worker, starts it afresh."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or token is None or not lease.owned(job, token):
            return
        job.status = "pending"
        job.error = error[:2000]
        job.worker = None
        job.heartbeat_at = None


def finish(session: Session, job: Job, *, ok: bool, error: str | None = None, **cost: Any) -> None:
    job.status = "succeeded" if ok else "failed"
    job.finished_at = utcnow()
    job.progress = 1.0 if ok else job.progress
    job.error = error
    job.cost = {**job.cost, **cost}
    openlineage.job_finished(session, job)  # emitted after commit, when configured


class ProgressReporter:
    """Writes progress in its own short transactions, at most every `interval` seconds,
    so the API and dashboard see it while the job's own work is uncommitted."""

    def __init__(
        self,
        job_id: str,
        lo: float = 0.0,
        hi: float = 1.0,
        interval: float | None = None,
        *,
        write: bool = True,
    ) -> None:
        self.job_id = job_id
        self.lo, self.hi = lo, hi
        self.interval = get_settings().progress_interval_seconds if interval is None else interval
        # False for one shard of a fanned-out job: the job's progress moves as shards
        # complete; the reporter still stops a shard whose job was taken over.
        self.write = write
        # When progress was last written: one clock for a reporter and every `sub` of
        # it, so that a job whose stages each get a sub-reporter still writes at most
        # once per interval.
        self._clock = [0.0]
        self._own = [0.0]
        self._kind: str | None = None

    def sub(self, lo: float, hi: float) -> ProgressReporter:
        span = self.hi - self.lo
        child = ProgressReporter(
            self.job_id,
            self.lo + span * lo,
            self.lo + span * hi,
            self.interval,
            write=self.write,
        )
        child._clock = self._clock
        return child

    def __call__(self, fraction: float) -> None:
        # Stop here if the job was handed to another worker meanwhile (lease lost).
        lease.check(self.job_id)
        now = time.monotonic()
        # Within the interval, only the end of the whole job is still written (the end
        # of a stage's sub-range is not the job's). Under the test hook that slows jobs
        # down, each reporter keeps its own clock and writes at its end, as it always did,
        # so the hook's slowing (a sleep per write) stays what the crash tests expect.
        own = get_settings().test_slow_unlearning_seconds > 0
        clock = self._own if own else self._clock
        end = fraction >= 1.0 and (own or self.hi >= 1.0)
        if now - clock[0] < self.interval and not end:
            return
        clock[0] = now
        value = self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0)
        stmt = (
            update(Job)
            .where(Job.id == self.job_id, Job.progress < value, Job.status == "running")
            .values(progress=value)
        )
        token = lease.token(self.job_id)
        if token is not None:
            stmt = stmt.where(Job.attempts == token)
        if self.write:
            with session_scope() as s:
                s.execute(stmt)
        if self._test_delay():
            clock[0] = time.monotonic()  # slowed down by about (1 + 2 delay) at most

    def _test_delay(self) -> bool:
        """The test hook PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS (never set in
        production): slow an unlearning job down so a test can crash its worker."""
        delay = get_settings().test_slow_unlearning_seconds
        if delay <= 0:
            return False
        if self._kind is None:
            with session_scope() as s:
                self._kind = s.scalar(select(Job.kind).where(Job.id == self.job_id)) or ""
        if self._kind != "unlearn":
            return False
        time.sleep(delay)
        return True


ProgressFn = Callable[[float], None]
