"""Prometheus metrics, read from the database (and the broker) at scrape time, so every
API process reports the same numbers whichever handled the work."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from app.core.broker import queue_depth
from app.core.db import session_factory
from app.core.settings import get_settings
from app.integrations import mlflow_mirror
from app.models import DeletionRequest, Job
from app.models.base import utcnow
from app.models.webhooks import WebhookDelivery
from app.requests.states import STATUSES, TERMINAL

log = logging.getLogger(__name__)


class PalimpsestCollector(Collector):
    def collect(self) -> Iterator[Any]:
        session = session_factory()()
        try:
            yield from self._requests(session)
            yield from self._jobs(session)
            yield from self._webhooks(session)
            yield from self._mirrors(session)
        finally:
            session.close()
        yield from self._queues()

    def _requests(self, session: Any) -> Iterator[Any]:
        by_status = GaugeMetricFamily(
            "palimpsest_requests", "Deletion requests by status", labels=["status"]
        )
        counts = dict(
            session.execute(
                select(DeletionRequest.status, func.count()).group_by(DeletionRequest.status)
            ).all()
        )
        for status in STATUSES:
            by_status.add_metric([status], float(counts.get(status, 0)))
        yield by_status
        overdue = session.scalar(
            select(func.count())
            .select_from(DeletionRequest)
            .where(DeletionRequest.status.not_in(TERMINAL), DeletionRequest.due_at <= utcnow())
        )
        yield GaugeMetricFamily(
            "palimpsest_requests_overdue", "Open requests past their deadline", value=overdue or 0
        )

    def _jobs(self, session: Any) -> Iterator[Any]:
        jobs = CounterMetricFamily(
            "palimpsest_jobs", "Jobs by kind and status", labels=["kind", "status"]
        )
        seconds = CounterMetricFamily(
            "palimpsest_job_wall_seconds", "Wall time of finished jobs", labels=["kind"]
        )
        per_kind: dict[str, float] = {}
        for kind, cost in session.execute(select(Job.kind, Job.cost)):
            per_kind[kind] = per_kind.get(kind, 0.0) + float((cost or {}).get("wall_seconds") or 0)
        for kind, status, n in session.execute(
            select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
        ):
            jobs.add_metric([kind, status], float(n))
        for kind, total in per_kind.items():
            seconds.add_metric([kind], total)
        yield jobs
        yield seconds

    def _webhooks(self, session: Any) -> Iterator[Any]:
        deliveries = GaugeMetricFamily(
            "palimpsest_webhook_deliveries",
            "Webhook deliveries by status (failed: retries exhausted)",
            labels=["status"],
        )
        counts = dict(
            session.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            ).all()
        )
        for status in ("pending", "delivered", "failed", "cancelled"):
            deliveries.add_metric([status], float(counts.get(status, 0)))
        yield deliveries

    def _mirrors(self, session: Any) -> Iterator[Any]:
        mirrors = GaugeMetricFamily(
            "palimpsest_registry_mirrors",
            "Models' MLflow registry mirrors by status (failing: retrying after an error)",
            labels=["status"],
        )
        for status, n in mlflow_mirror.counts(session).items():
            mirrors.add_metric([status], float(n))
        yield mirrors

    def _queues(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "palimpsest_queue_depth", "Messages waiting in the broker", labels=["queue"]
        )
        try:
            for q, n in queue_depth(get_settings().broker_url).items():
                depth.add_metric([q], float(n))
        except Exception as exc:  # the broker being down must not take /metrics down
            log.warning("queue depth unavailable: %s", type(exc).__name__)
        yield depth


def registry() -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PalimpsestCollector())
    return reg
