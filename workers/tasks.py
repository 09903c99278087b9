"""Thin tasks: take ids, call a service, let the session scope commit."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Task, shared_task
from sqlalchemy import select

from app.core.db import enqueue, session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.models import DeletionRequest, Job
from app.models.base import utcnow
from app.registry import fanout, retraining, runner
from app.requests import deadlines, lifecycle

log = logging.getLogger(__name__)
MAX_RETRIES = 2


def _run_job(task: Task, fn: Any, job_id: str, lock_retry: float = 2.0) -> None:
    try:
        fn(job_id)
    except runner.ModelBusy as exc:
        # Serialised per model: wait for the other job without burning a retry.
        raise task.retry(countdown=lock_retry, max_retries=None) from exc
    except Exception as exc:
        log.exception("job %s failed (attempt %s)", job_id, task.request.retries + 1)
        if task.request.retries < MAX_RETRIES:
            raise task.retry(countdown=2**task.request.retries, exc=exc) from exc
        runner.fail_job(job_id, f"{type(exc).__name__}: {exc}")


@shared_task(name="palimpsest.train_model", bind=True, acks_late=True)
def train_model(self: Task, job_id: str) -> None:
    _run_job(self, runner.run_training, job_id)


@shared_task(name="palimpsest.run_unlearning", bind=True, acks_late=True)
def run_unlearning(self: Task, job_id: str) -> None:
    _run_job(self, runner.run_unlearning, job_id)


@shared_task(name="palimpsest.run_retrain", bind=True, acks_late=True)
def run_retrain(self: Task, job_id: str) -> None:
    _run_job(self, retraining.run_retrain, job_id)


@shared_task(name="palimpsest.sisa_shard", bind=True, acks_late=True, ignore_result=False)
def sisa_shard(self: Task, job_id: str, shard: int) -> dict[str, Any]:
    """One shard of a fanned-out SISA job (a chord header task)."""
    try:
        return fanout.train_one_shard(job_id, shard)
    except Exception as exc:
        if self.request.retries < MAX_RETRIES:
            raise self.retry(countdown=2**self.request.retries, exc=exc) from exc
        # The chord's callback will never run: fail the job here, releasing its lock.
        runner.fail_job(job_id, f"shard {shard}: {type(exc).__name__}: {exc}")
        raise


@shared_task(name="palimpsest.sisa_finish", bind=True, acks_late=True)
def sisa_finish(self: Task, results: list[dict[str, Any]], job_id: str) -> None:
    """The chord's callback: verify and conclude the job."""
    try:
        retraining.finish_chord(job_id, results)
    except Exception as exc:
        if self.request.retries < MAX_RETRIES:
            raise self.retry(countdown=2**self.request.retries, exc=exc) from exc
        runner.fail_job(job_id, f"{type(exc).__name__}: {exc}")


@shared_task(name="palimpsest.plan_request", bind=True, acks_late=True, max_retries=5)
def plan_request(self: Task, request_id: str) -> None:
    try:
        with session_scope() as s:
            lifecycle.plan(s, request_id)
    except Exception as exc:
        raise self.retry(countdown=2, exc=exc) from exc


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
def resume_stalled(older_than_seconds: float = 120.0) -> dict[str, int]:
    """Beat: re-send work whose task was lost (broker down at commit time, a crash).
    Safe because every task is idempotent."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    counts = {"jobs": 0, "requests": 0}
    with session_scope() as s:
        for job in s.scalars(select(Job).where(Job.status == "pending", Job.created_at < cutoff)):
            name = {
                "train": "palimpsest.train_model",
                "retrain": "palimpsest.run_retrain",
            }.get(job.kind, "palimpsest.run_unlearning")
            enqueue(s, name, job.id, queue="gpu")
            counts["jobs"] += 1
        for req in s.scalars(
            select(DeletionRequest).where(
                DeletionRequest.status.in_(("received", "erasing")),
                DeletionRequest.received_at < cutoff,
            )
        ):
            name = (
                "palimpsest.plan_request"
                if req.status == "received"
                else "palimpsest.erase_request"
            )
            enqueue(s, name, req.id)
            counts["requests"] += 1
    return counts


@shared_task(name="palimpsest.deliver_webhook", acks_late=True)
def deliver_webhook(delivery_id: str) -> str:
    """One attempt of one webhook delivery; retries are scheduled by the delivery itself
    (countdown plus `next_attempt_at`), so a failing receiver never fails the task."""
    from app.webhooks import delivery

    return delivery.deliver(delivery_id)


@shared_task(name="palimpsest.sweep_webhooks")
def sweep_webhooks() -> int:
    """Beat: re-send webhook deliveries whose attempt is overdue (a lost task)."""
    from app.webhooks import delivery

    return delivery.sweep()


@shared_task(name="palimpsest.release_batches")
def release_batches() -> dict[str, int]:
    """Beat: send held unlearning jobs whose batching window, maximum wait or a
    request's deadline has come."""
    from app.requests import batching

    with session_scope() as s:
        return batching.release_due(s)
