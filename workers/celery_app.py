"""The Celery app, built from settings: queues `gpu` (training, unlearning) and `default`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import Celery, chord
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
)
from kombu import Queue

from app.core import outbox
from app.core.logging import HEADER as REQUEST_ID_HEADER
from app.core.outbox import PendingTask
from app.core.settings import Settings, get_settings
from workers import producers

log = logging.getLogger(__name__)


def _transport_options(settings: Settings) -> dict[str, object]:
    url = settings.broker_url
    if url.startswith("sqla+"):
        # kombu hands these to create_engine: let SQLite writers wait for each other.
        # (This transport never redelivers a message a dead worker took: the resume
        # sweep's heartbeat check is the only recovery there.)
        return {"connect_args": {"timeout": 30}} if "sqlite" in url else {}
    # Recovery from a dead worker does not wait for Redis to redeliver: a running job
    # carries a heartbeat, and the beat's resume sweep takes over one whose heartbeat is
    # older than PALIMPSEST_JOB_LEASE_SECONDS (a minute), on every broker, also after a
    # broker restart that lost the messages. Redelivery after the visibility timeout is
    # a backstop only, so the timeout is long (6 h by default): longer than any shard
    # or job step, as a message redelivered while its task still runs is work done twice
    # (a duplicate job delivery is a no-op, but a chord shard would train again); it also
    # bounds how often Redis redelivers a waiting countdown (webhook retries, which check
    # their own state).
    return {"visibility_timeout": settings.broker_visibility_timeout}


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    settings.ensure_local_dirs()
    app = Celery("palimpsest", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        task_queues=(Queue("default"), Queue("gpu"), Queue("webhooks")),
        task_default_queue="default",
        # Tasks are idempotent, so a redelivery after a crash is safe: ack only when done.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        beat_schedule={
            # Takes over jobs whose worker died (stale heartbeat), re-sends lost work.
            "resume-stalled-work": {
                "task": "palimpsest.resume_stalled",
                "schedule": settings.resume_interval_seconds,
            },
            # Re-sends webhook deliveries whose countdown task was lost.
            "webhook-sweep": {"task": "palimpsest.sweep_webhooks", "schedule": 30.0},
            # Re-sends platform callbacks (Fides) whose countdown task was lost.
            "integration-callback-sweep": {
                "task": "palimpsest.sweep_integration_callbacks",
                "schedule": 30.0,
            },
            # Retries MLflow mirror syncs (PALIMPSEST_MLFLOW_TRACKING_URI; else a no-op).
            "registry-mirror-sweep": {
                "task": "palimpsest.sweep_registry_mirrors",
                "schedule": 30.0,
            },
            "deadline-watchdog": {"task": "palimpsest.deadline_watchdog", "schedule": 300.0},
            # Batching: send held jobs when their window, maximum wait or a deadline comes.
            "release-batches": {
                "task": "palimpsest.release_batches",
                "schedule": settings.batch_release_interval,
            },
        },
        timezone="UTC",
    )
    app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
    app.autodiscover_tasks(["workers"], related_name="integrations", force=True)
    return app


@lru_cache
def get_celery() -> Celery:
    return create_celery()


# A broker that is down must not hold the caller (an HTTP request, a job's last step)
# for long: kombu would otherwise retry the connection without end. What cannot be
# sent within a few seconds is re-sent by the beat's resume sweep.
_SEND_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


class CelerySender:
    """The outbox's sender in every process that talks to the broker (API, worker, beat,
    CLI): `app.core.outbox` holds tasks until commit, this publishes them."""

    def _options(self, task: PendingTask) -> dict[str, Any]:
        return {
            "queue": task.queue,
            "countdown": task.countdown,
            "headers": {REQUEST_ID_HEADER: task.request_id} if task.request_id else None,
        }

    def send(self, task: PendingTask, attempts: int = 3) -> None:
        """Publish on this thread's broker connection (workers/producers.py). A transient
        failure is retried; a task that still cannot be sent is re-sent by the resume
        sweep (tasks are idempotent)."""
        app = get_celery()
        for attempt in range(1, attempts + 1):
            try:
                producers.publish(
                    app,
                    task.name,
                    send={
                        "args": list(task.args),
                        "retry_policy": _SEND_RETRY,
                        # Nobody waits on these results: no subscription to the result
                        # store (which would block on it too when Redis is down).
                        "ignore_result": True,
                        **self._options(task),
                    },
                )
                return
            except Exception:
                if attempt == attempts:
                    log.exception("could not send %s%s; it will be resumed", task.name, task.args)

    def chord(self, header: Sequence[PendingTask], callback: PendingTask) -> None:
        """Shard tasks joined by their callback (the chord's results live in the result
        backend, which is what a chord is for)."""
        app = get_celery()
        sigs = [app.signature(t.name, args=t.args, queue=t.queue) for t in header]
        body = app.signature(callback.name, args=callback.args, queue=callback.queue)
        chord(sigs, app=app)(body)


def install_sender() -> None:
    """Register the Celery sender with the outbox (idempotent)."""
    outbox.register_sender(CelerySender())


# Importing the Celery app (every worker and beat does) installs its sender.
install_sender()


def _name_connections(**_: Any) -> None:
    """Worker processes name their database connections (PostgreSQL's application_name),
    so operators, and the crash tests, can tell them from the API's."""
    from app.core.db import set_application_name

    set_application_name("palimpsest-worker")


worker_init.connect(_name_connections, weak=False)
worker_process_init.connect(_name_connections, weak=False)


def _warm_up(**_: Any) -> None:
    """Pay torch's one-off start-up costs (deterministic mode imports the compiler stack,
    about 2 s) when the worker starts, not inside the first job's measured time."""
    from app.ml.device import enable_determinism

    enable_determinism()


worker_init.connect(_warm_up, weak=False)
worker_process_init.connect(_warm_up, weak=False)


def _logging(**_: Any) -> None:
    """Our JSON logs instead of Celery's own setup."""
    from app.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


def _restore_request_id(task: Any = None, **_: Any) -> None:
    """The HTTP request's id, carried in the message header, for this task's logs (and
    for the tasks it enqueues in turn)."""
    from app.core.logging import HEADER, request_id_var

    if task is None:
        return
    task.request._palimpsest_token = request_id_var.set(getattr(task.request, HEADER, None))


def _clear_request_id(task: Any = None, **_: Any) -> None:
    from app.core.logging import request_id_var

    token = getattr(task.request, "_palimpsest_token", None) if task is not None else None
    if token is not None:
        request_id_var.reset(token)


setup_logging.connect(_logging, weak=False)
task_prerun.connect(_restore_request_id, weak=False)
task_postrun.connect(_clear_request_id, weak=False)
