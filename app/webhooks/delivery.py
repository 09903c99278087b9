"""Sending one delivery: sign with Standard Webhooks, POST, record, schedule the retry.

At-least-once: a message can arrive twice (a crash between the POST and the commit, a
redelivery); receivers deduplicate on `webhook-id`, which never changes for a message.
A delivery that is no longer pending is never sent again by a task.

Retry schedule after a failed attempt (not 2xx, not 410, or no answer in 10 s), the
first attempt being immediate: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, 14 h, 20 h —
ten attempts over about 2.6 days, then the delivery is `failed`. Each retry is sent with
a Celery countdown and also recorded in `next_attempt_at`, which the beat's sweep
re-sends when the countdown task was lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from app.core.db import enqueue, session_scope
from app.core.settings import get_settings
from app.models.base import utcnow
from app.models.webhooks import WebhookDelivery, WebhookEndpoint, WebhookEvent
from app.webhooks import service, targets

log = logging.getLogger(__name__)

RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
    timedelta(hours=14),
    timedelta(hours=20),
)
TIMEOUT_SECONDS = 10.0
# While an attempt is in flight its delivery is leased: the sweep and duplicate tasks
# leave it alone until the lease runs out (longer than the HTTP timeout).
LEASE = timedelta(seconds=60)
# A task may be run a little before `next_attempt_at` (clock skew between hosts).
EARLY = timedelta(seconds=2)
HISTORY_KEEP = 20


@dataclass(frozen=True)
class _Attempt:
    url: str
    secret: str
    msg_id: str
    body: str


def body_of(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def signed_headers(secret: str, msg_id: str, body: str, at: datetime) -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id=msg_id, timestamp=at, data=body)
    return {
        "content-type": "application/json",
        "user-agent": "palimpsest-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


def _claim(delivery_id: str) -> _Attempt | None:
    """Lease a due, pending delivery whose endpoint is enabled; None when there is
    nothing to do (already delivered, not due yet, in flight elsewhere)."""
    with session_scope() as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None or d.status != "pending":
            return None
        now = utcnow()
        if d.next_attempt_at is not None and d.next_attempt_at > now + EARLY:
            return None
        ep = s.get(WebhookEndpoint, d.endpoint_id)
        if ep is None or ep.disabled_at is not None:
            d.status = "cancelled"
            d.next_attempt_at = None
            return None
        d.next_attempt_at = now + LEASE
        return _Attempt(ep.url, ep.secret, d.msg_id, body_of(d.payload))


def _post(attempt: _Attempt) -> tuple[int | None, str | None]:
    # Checked again now, after resolving the name now: the address may have changed
    # since registration (DNS rebinding), or the allowed networks may have. The POST
    # goes to the address that passed, never to a second resolution of the name.
    try:
        target = targets.vet(attempt.url, get_settings().webhook_networks)
    except targets.TargetRefused as exc:
        log.warning("webhook delivery refused: %s", exc)
        return None, f"refused: {exc}"[:500]
    headers = signed_headers(attempt.secret, attempt.msg_id, attempt.body, utcnow())
    headers["host"] = target.host_header
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as client:
            resp = client.post(
                target.pinned_url,
                content=attempt.body.encode(),
                headers=headers,
                # TLS: SNI and certificate checks are for the name, not the address.
                extensions={"sni_hostname": target.host},
            )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= resp.status_code < 300:
        return resp.status_code, None
    return resp.status_code, f"HTTP {resp.status_code}"


def deliver(delivery_id: str) -> str:
    """One attempt. Returns the delivery's status afterwards ('skipped' when none was
    made). The HTTP call happens outside any transaction."""
    attempt = _claim(delivery_id)
    if attempt is None:
        return "skipped"
    code, error = _post(attempt)
    with session_scope() as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None:  # the endpoint was deleted meanwhile
            return "skipped"
        now = utcnow()
        d.attempts += 1
        d.last_attempt_at = now
        d.last_status_code = code
        d.last_error = error
        entry = {"at": now.isoformat(), "status_code": code, "error": error}
        d.history = [*d.history, entry][-HISTORY_KEEP:]
        if d.status != "pending":  # delivered by a concurrent duplicate, or cancelled
            return d.status
        if error is None:
            d.status = "delivered"
            d.delivered_at = now
            d.next_attempt_at = None
        elif code == 410:
            d.status = "failed"
            d.next_attempt_at = None
            ep = s.get(WebhookEndpoint, d.endpoint_id)
            if ep is not None:
                service.disable_endpoint(s, ep, "receiver answered 410 Gone")
        else:
            d.failures += 1
            if d.failures > len(RETRY_SCHEDULE):
                d.status = "failed"
                d.next_attempt_at = None
            else:
                wait = RETRY_SCHEDULE[d.failures - 1]
                d.next_attempt_at = now + wait
                enqueue(
                    s,
                    service.DELIVER_TASK,
                    d.id,
                    queue=service.QUEUE,
                    countdown=wait.total_seconds(),
                )
        log.info("webhook delivery %s: %s (%s)", d.id, d.status, error or code)
        return d.status


def fan_out(event_id: str) -> int:
    """The worker's side of `service.emit`: the event's deliveries, sent after commit."""
    with session_scope() as s:
        return len(service.fan_out(s, event_id))


# Events fanned out per transaction by `fan_out_many`.
FAN_OUT_BATCH = 200


def fan_out_many(event_ids: Sequence[str]) -> int:
    """`palimpsest.fan_out_webhooks`: several events, `FAN_OUT_BATCH` per transaction;
    the number of deliveries made. If a batch fails, its events are fanned out one by
    one; one that fails alone is left to the sweep (it is still not fanned out)."""
    unique = list(dict.fromkeys(event_ids))
    made = 0
    for i in range(0, len(unique), FAN_OUT_BATCH):
        part = unique[i : i + FAN_OUT_BATCH]
        try:
            with session_scope() as s:
                made += len(service.fan_out_many(s, part))
            continue
        except Exception:
            log.warning("fanning out %d events together failed", len(part), exc_info=True)
        for event_id in part:
            try:
                made += fan_out(event_id)
            except Exception:
                log.exception("fanning out event %s failed; the sweep re-sends it", event_id)
    return made


def sweep(grace: timedelta = timedelta(seconds=30), limit: int = 500) -> int:
    """Beat: re-send pending deliveries whose attempt is overdue by more than `grace`, and
    events not fanned out within it (their task was lost: broker down at commit, a worker
    crash, a dropped ETA)."""
    with session_scope() as s:
        events = s.scalars(
            select(WebhookEvent.id)
            .where(
                WebhookEvent.fanned_out_at.is_(None),
                WebhookEvent.created_at < utcnow() - grace,
            )
            .order_by(WebhookEvent.created_at)
            .limit(limit)
        ).all()
        for event_id in events:
            enqueue(
                s,
                service.FAN_OUT_TASK,
                event_id,
                queue=service.QUEUE,
                batch=service.FAN_OUT_MANY_TASK,
            )
        ids = s.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at < utcnow() - grace,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
        for delivery_id in ids:
            enqueue(s, service.DELIVER_TASK, delivery_id, queue=service.QUEUE)
        return len(ids) + len(events)
