"""Thin tasks: take ids, call a service, let the session scope commit."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from sqlalchemy.exc import DBAPIError

from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.jobs import lease, recovery
from app.jobs import service as jobs
from app.pipeline import fanout, features, ingest, retraining, training, unlearning
from app.pipeline.conclude import fail_job
from app.pipeline.start import ModelBusy
from app.requests import deadlines, lifecycle
from app.requests.lifecycle import EVENTS

log = logging.getLogger(__name__)
MAX_RETRIES = 2
DB_RETRIES = 8  # backing off up to 30 s: rides out a database failover


def _run_job(task: Task, fn: Any, job_id: str, lock_retry: float = 2.0) -> None:
    """Run a whole job under its lease (a heartbeat thread while it runs).

    Crash safety: the task is acknowledged only when it returns (acks_late), and every
    step is idempotent, so any delivery may run it again. A job running on a live worker
    makes a duplicate delivery a no-op; one whose worker died (its heartbeat stale) is
    taken over by the next delivery or by the resume sweep; an execution that was taken
    over stops at its next progress report and concludes nothing (LeaseLost)."""
    try:
        with lease.held(job_id) as held:
            try:
                fn(job_id)
            except ModelBusy as exc:
                # Serialised per model: wait for the other job without burning a retry.
                raise task.retry(countdown=lock_retry, max_retries=None) from exc
            except lease.LeaseLost:
                raise
            except Exception as exc:
                log.exception("job %s failed (attempt %s)", job_id, task.request.retries + 1)
                error = f"{type(exc).__name__}: {exc}"
                retries = task.request.retries
                limit = DB_RETRIES if _dropped_connection(exc) else MAX_RETRIES
                if retries < limit:
                    # Back to pending (lock kept), so the retry starts it on any worker.
                    _quietly(jobs.release, job_id, held.token, error)
                    raise task.retry(
                        countdown=min(2**retries, 30), exc=exc, max_retries=limit
                    ) from exc
                fail_job(job_id, error, EVENTS, token=held.token)
    except lease.LeaseLost as exc:
        log.warning("job %s: this execution stops, another one owns the job (%s)", job_id, exc)


def _dropped_connection(exc: BaseException) -> bool:
    """The database connection went away under a statement (a restart, a failover,
    pg_terminate_backend): the pool replaces it, so the job is worth more tries than a
    failure of its own."""
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _retry(task: Task, exc: Exception) -> None:
    """Retry a chord task with backoff while it has tries left (more after a dropped
    database connection); return when it has none."""
    limit = DB_RETRIES if _dropped_connection(exc) else MAX_RETRIES
    if task.request.retries < limit:
        countdown = min(2**task.request.retries, 30)
        raise task.retry(countdown=countdown, exc=exc, max_retries=limit) from exc


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        # The database may be what failed; a stale lease is then recovered by the sweep.
        log.warning("could not record %s%s", getattr(fn, "__name__", fn), args, exc_info=True)


# The pipeline reports to the requests through EVENTS (app.requests.lifecycle): the
# task layer is where the two meet.


@shared_task(name="palimpsest.train_model", bind=True, acks_late=True)
def train_model(self: Task, job_id: str) -> None:
    _run_job(self, training.run_training, job_id)


@shared_task(name="palimpsest.run_unlearning", bind=True, acks_late=True)
def run_unlearning(self: Task, job_id: str) -> None:
    _run_job(self, lambda j: unlearning.run_unlearning(j, EVENTS), job_id)


@shared_task(name="palimpsest.run_feature", bind=True, acks_late=True)
def run_feature(self: Task, job_id: str) -> None:
    _run_job(self, lambda j: features.run_feature(j, EVENTS), job_id)


@shared_task(name="palimpsest.run_retrain", bind=True, acks_late=True)
def run_retrain(self: Task, job_id: str) -> None:
    _run_job(self, lambda j: retraining.run_retrain(j, EVENTS), job_id)


@shared_task(name="palimpsest.ingest_dataset", bind=True, acks_late=True)
def ingest_dataset(self: Task, job_id: str) -> None:
    """A large upload: parse, check and store it (app.pipeline.ingest)."""
    _run_job(self, ingest.run_ingest, job_id)


@shared_task(name="palimpsest.sisa_shard", bind=True, acks_late=True, ignore_result=False)
def sisa_shard(self: Task, job_id: str, shard: int, attempt: int | None = None) -> dict[str, Any]:
    """One shard of a fanned-out SISA job (a chord header task), heartbeating the job
    for the attempt that sent it."""
    try:
        with lease.held(job_id, attempt, exclusive=False):
            return fanout.train_one_shard(job_id, shard, attempt)
    except lease.LeaseLost:
        # The chord of a taken-over attempt: its callback will do nothing either.
        return {"stale": True}
    except Exception as exc:
        _retry(self, exc)
        # The chord's callback will never run: fail the job here, releasing its lock.
        fail_job(job_id, f"shard {shard}: {type(exc).__name__}: {exc}", EVENTS, token=attempt)
        raise


@shared_task(name="palimpsest.sisa_finish", bind=True, acks_late=True)
def sisa_finish(
    self: Task, results: list[dict[str, Any]], job_id: str, attempt: int | None = None
) -> None:
    """The chord's callback: verify and conclude the job."""
    try:
        with lease.held(job_id, attempt, exclusive=False):
            fanout.finish_chord(job_id, results, EVENTS, attempt)
    except lease.LeaseLost:
        log.warning("job %s: the chord of attempt %s was taken over", job_id, attempt)
    except Exception as exc:
        _retry(self, exc)
        fail_job(job_id, f"{type(exc).__name__}: {exc}", EVENTS, token=attempt)


@shared_task(name="palimpsest.plan_request", bind=True, acks_late=True, max_retries=5)
def plan_request(self: Task, request_id: str) -> None:
    try:
        lifecycle.plan_in_steps(request_id)
    except Exception as exc:
        raise self.retry(countdown=2, exc=exc) from exc


@shared_task(name="palimpsest.plan_requests", acks_late=True)
def plan_requests(request_ids: list[str]) -> int:
    """Plan a batch of requests (the intake sends one task per committed batch), most
    in one transaction (`lifecycle.plan_many`). A request whose planning fails even on
    its own goes back to its own `palimpsest.plan_request` task in 2 s, with that task's
    retries; the others are planned regardless. Returns how many failed."""
    failed = lifecycle.plan_many(request_ids)
    if failed:
        lifecycle.retry_alone(failed, countdown=2.0)
    return len(failed)


@shared_task(name="palimpsest.erase_request", bind=True, acks_late=True, max_retries=5)
def erase_request(self: Task, request_id: str) -> None:
    try:
        with session_scope() as s:
            lifecycle.erase(s, get_store(), request_id)
    except Exception as exc:
        raise self.retry(countdown=2, exc=exc) from exc


@shared_task(name="palimpsest.deadline_watchdog")
def deadline_watchdog() -> dict[str, int]:
    """Beat: announce requests near or past their legal deadline (once each)."""
    with session_scope() as s:
        return deadlines.sweep(s, get_settings().deadline_warning_days)


@shared_task(name="palimpsest.resume_stalled")
def resume_stalled(older_than_seconds: float | None = None) -> dict[str, int]:
    """Beat: take over jobs whose worker died (stale heartbeat) and re-send work whose
    task was lost (broker down at commit time, a crash). Safe because every task is
    idempotent; see app.jobs.recovery."""
    with session_scope() as s:
        return recovery.resume(s, older_than_seconds)


@shared_task(name="palimpsest.deliver_webhook", acks_late=True)
def deliver_webhook(delivery_id: str) -> str:
    """One attempt of one webhook delivery; retries are scheduled by the delivery itself
    (countdown plus `next_attempt_at`), so a failing receiver never fails the task."""
    from app.webhooks import delivery

    return delivery.deliver(delivery_id)


@shared_task(name="palimpsest.fan_out_webhook", acks_late=True)
def fan_out_webhook(event_id: str) -> int:
    """One webhook event to one delivery per subscribed endpoint (idempotent), on the
    `webhooks` queue: the API request wrote a single outbox row."""
    from app.webhooks import delivery

    return delivery.fan_out(event_id)


@shared_task(name="palimpsest.fan_out_webhooks", acks_late=True)
def fan_out_webhooks(event_ids: list[str]) -> int:
    """Several webhook events fanned out at once (what a transaction that announced
    many sends), on the `webhooks` queue; the number of deliveries made."""
    from app.webhooks import delivery

    return delivery.fan_out_many(event_ids)


@shared_task(name="palimpsest.sweep_webhooks")
def sweep_webhooks() -> int:
    """Beat: re-send webhook deliveries whose attempt is overdue (a lost task)."""
    from app.webhooks import delivery

    return delivery.sweep()


@shared_task(name="palimpsest.release_batches")
def release_batches() -> dict[str, int]:
    """Beat: send held unlearning jobs whose batching window, maximum wait or a
    request's deadline has come."""
    from app.jobs import batching

    with session_scope() as s:
        return batching.release_due(s)
