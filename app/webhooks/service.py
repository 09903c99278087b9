"""Endpoints and the outbox. `emit` adds one event row to the caller's transaction,
whatever the number of endpoints, and asks a worker to fan it out after commit (queue
`webhooks`, so deliveries never wait in front of unlearning or erasure): a rolled-back
change announces nothing.

Payloads never carry raw personal data: requests are described by ids, statuses and at
most the pseudonymous subject key.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, delete, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core import bulk
from app.core.db import enqueue
from app.core.errors import Conflict, NotFound, Unprocessable
from app.core.settings import get_settings
from app.models import DeletionRequest, Job, MLModel
from app.models.base import new_id, utcnow
from app.models.webhooks import WebhookDelivery, WebhookEndpoint, WebhookEvent
from app.webhooks import targets
from app.webhooks.schemas import DeliveryOut, WebhookIn, WebhookOut

DELIVER_TASK = "palimpsest.deliver_webhook"
FAN_OUT_TASK = "palimpsest.fan_out_webhook"
# Several events of one transaction are fanned out by one task (see `emit`).
FAN_OUT_MANY_TASK = "palimpsest.fan_out_webhooks"
QUEUE = "webhooks"


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# -- endpoints ------------------------------------------------------------------------


def create_endpoint(session: Session, body: WebhookIn, actor: str) -> WebhookEndpoint:
    try:
        targets.vet(body.url, get_settings().webhook_networks)
    except targets.TargetRefused as exc:
        raise Unprocessable(f"url refused: {exc}", code="webhook_target_refused") from exc
    ep = WebhookEndpoint(
        url=body.url, events=list(body.events), secret=new_secret(), created_by=actor
    )
    session.add(ep)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="webhook.created",
        entity_type="webhook",
        entity_id=ep.id,
        data={"url": ep.url, "events": ep.events},
    )
    return ep


def get_endpoint(session: Session, webhook_id: str) -> WebhookEndpoint:
    ep = session.get(WebhookEndpoint, webhook_id)
    if ep is None:
        raise NotFound(f"no webhook {webhook_id!r}", code="webhook_not_found")
    return ep


def list_endpoints(session: Session) -> list[WebhookOut]:
    rows = session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.created_at))
    return [endpoint_out(ep) for ep in rows]


def endpoint_out(ep: WebhookEndpoint) -> WebhookOut:
    return WebhookOut(
        id=ep.id,
        url=ep.url,
        events=list(ep.events),
        enabled=ep.disabled_at is None,
        disabled_at=ep.disabled_at,
        disabled_reason=ep.disabled_reason,
        created_at=ep.created_at,
        secret_rotated_at=ep.secret_rotated_at,
    )


def rotate_secret(session: Session, webhook_id: str, actor: str) -> WebhookEndpoint:
    """Replace the secret. Messages are signed when sent, so from the commit on every
    attempt, retries of older messages included, is signed with the new secret only."""
    ep = get_endpoint(session, webhook_id)
    ep.secret = new_secret()
    ep.secret_rotated_at = utcnow()
    audit.record(
        session,
        actor=actor,
        action="webhook.secret_rotated",
        entity_type="webhook",
        entity_id=ep.id,
        data={},
    )
    return ep


def delete_endpoint(session: Session, webhook_id: str, actor: str) -> None:
    ep = get_endpoint(session, webhook_id)
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == ep.id))
    session.delete(ep)
    audit.record(
        session,
        actor=actor,
        action="webhook.deleted",
        entity_type="webhook",
        entity_id=webhook_id,
        data={"url": ep.url},
    )


def list_deliveries(
    session: Session, webhook_id: str, status: str | None, limit: int
) -> list[DeliveryOut]:
    get_endpoint(session, webhook_id)
    q = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == webhook_id)
    if status:
        q = q.where(WebhookDelivery.status == status)
    q = q.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)
    return [delivery_out(d) for d in session.scalars(q)]


def delivery_out(d: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut.model_validate(
        {
            "id": d.id,
            "msg_id": d.msg_id,
            "event_type": d.event_type,
            "status": d.status,
            "attempts": d.attempts,
            "last_status_code": d.last_status_code,
            "last_error": d.last_error,
            "last_attempt_at": d.last_attempt_at,
            "next_attempt_at": d.next_attempt_at,
            "delivered_at": d.delivered_at,
            "created_at": d.created_at,
            "history": d.history,
        }
    )


def redeliver(session: Session, webhook_id: str, delivery_id: str, actor: str) -> DeliveryOut:
    """Queue the same message (same webhook-id, so receivers can deduplicate) again, now,
    with a fresh retry schedule, whatever its state: a receiver may have lost it."""
    ep = get_endpoint(session, webhook_id)
    d = session.get(WebhookDelivery, delivery_id)
    if d is None or d.endpoint_id != ep.id:
        raise NotFound(f"no delivery {delivery_id!r} for this webhook", code="delivery_not_found")
    if ep.disabled_at is not None:
        raise Conflict(
            "the webhook is disabled (its receiver answered 410)", code="webhook_disabled"
        )
    d.status = "pending"
    d.failures = 0
    d.next_attempt_at = utcnow()
    audit.record(
        session,
        actor=actor,
        action="webhook.redelivered",
        entity_type="webhook",
        entity_id=ep.id,
        data={"delivery_id": d.id, "msg_id": d.msg_id},
    )
    enqueue(session, DELIVER_TASK, d.id, queue=QUEUE)
    return delivery_out(d)


def enable_endpoint(session: Session, webhook_id: str, actor: str) -> WebhookEndpoint:
    """Re-enable an endpoint disabled by a 410 (the receiver is back). Deliveries cancelled
    while it was off stay cancelled; an admin can redeliver them one by one."""
    ep = get_endpoint(session, webhook_id)
    if ep.disabled_at is None:
        raise Conflict("the webhook is already enabled", code="webhook_enabled")
    audit.record(
        session,
        actor=actor,
        action="webhook.enabled",
        entity_type="webhook",
        entity_id=ep.id,
        data={"was_disabled_at": ep.disabled_at.isoformat(), "reason": ep.disabled_reason},
    )
    ep.disabled_at = None
    ep.disabled_reason = None
    return ep


def disable_endpoint(session: Session, ep: WebhookEndpoint, reason: str) -> None:
    """The receiver is gone for good: stop, and cancel what was still waiting for it."""
    ep.disabled_at = utcnow()
    ep.disabled_reason = reason[:200]
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == ep.id, WebhookDelivery.status == "pending")
        .values(status="cancelled", next_attempt_at=None)
    )


# -- the outbox -----------------------------------------------------------------------


def emit(session: Session, event_type: str, data: dict[str, Any]) -> WebhookEvent:
    """One outbox row for the event, fanned out to its subscribers after commit."""
    now = utcnow()
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    # The id is drawn here, so the row waits for the transaction's next flush.
    event = WebhookEvent(id=new_id(), event_type=event_type, payload=payload, created_at=now)
    session.add(event)
    # One transaction announcing many (a batch of requests planned) sends them as one
    # `FAN_OUT_MANY_TASK`.
    enqueue(session, FAN_OUT_TASK, event.id, queue=QUEUE, batch=FAN_OUT_MANY_TASK)
    return event


def msg_id(event_id: str, endpoint_id: str) -> str:
    """The `webhook-id` of an event's message to one endpoint: the same however often the
    event is fanned out, so a repeated fan-out cannot send a second message."""
    return "msg_" + hashlib.sha256(f"{event_id}:{endpoint_id}".encode()).hexdigest()[:32]


def _delivery(
    event_id: str, event_type: str, payload: dict[str, Any], endpoint_id: str, now: datetime
) -> WebhookDelivery:
    """An event's pending delivery to one endpoint, its id drawn here."""
    return WebhookDelivery(
        id=new_id(),
        endpoint_id=endpoint_id,
        msg_id=msg_id(event_id, endpoint_id),
        event_type=event_type,
        payload=payload,
        status="pending",
        next_attempt_at=now,
        history=[],
    )


def fan_out(session: Session, event_id: str) -> list[str]:
    """One pending delivery per enabled endpoint subscribed to the event (idempotent);
    each is sent after commit. Returns the new deliveries' ids. An endpoint registered
    after the event happened does not get it, however late the fan-out runs."""
    event = session.get(WebhookEvent, event_id, with_for_update=True)
    if event is None or event.fanned_out_at is not None:
        return []
    endpoints = session.scalars(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.disabled_at.is_(None),
            WebhookEndpoint.created_at <= event.created_at,
        )
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    ).all()
    now = utcnow()
    ids: list[str] = []
    for ep in endpoints:
        if event.event_type not in ep.events:
            continue
        d = _delivery(event.id, event.event_type, event.payload, ep.id, now)
        session.add(d)
        session.flush()
        enqueue(session, DELIVER_TASK, d.id, queue=QUEUE)
        ids.append(d.id)
    event.fanned_out_at = now
    event.deliveries = len(ids)
    return ids


def fan_out_many(session: Session, event_ids: Sequence[str]) -> list[str]:
    """`fan_out` for several events at once: one query for the endpoints, deliveries
    added without a round trip each, the events marked with a statement per delivery
    count. Each event gets exactly the deliveries `fan_out` would give it."""
    events = session.execute(
        select(
            WebhookEvent.id,
            WebhookEvent.event_type,
            WebhookEvent.payload,
            WebhookEvent.created_at,
        )
        .where(WebhookEvent.id.in_(sorted(set(event_ids))), WebhookEvent.fanned_out_at.is_(None))
        .order_by(WebhookEvent.id)
        .with_for_update()
    ).all()
    if not events:
        return []
    endpoints = session.scalars(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.disabled_at.is_(None),
            WebhookEndpoint.created_at <= max(e.created_at for e in events),
        )
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    ).all()
    now = utcnow()
    ids: list[str] = []
    counts: dict[int, list[str]] = {}
    for event in sorted(events, key=lambda e: (e.created_at, e.id)):
        n = 0
        for ep in endpoints:
            if ep.created_at > event.created_at or event.event_type not in ep.events:
                continue
            d = _delivery(event.id, event.event_type, event.payload, ep.id, now)
            session.add(d)
            enqueue(session, DELIVER_TASK, d.id, queue=QUEUE)
            ids.append(d.id)
            n += 1
        counts.setdefault(n, []).append(event.id)
    session.flush()
    for n, done in counts.items():
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id.in_(done))
            .values(fanned_out_at=now, deliveries=n)
            .execution_options(synchronize_session=False)
        )
    return ids


def _request_data(req: DeletionRequest) -> dict[str, Any]:
    return {"request_id": req.id, "kind": req.kind, "subject_key": req.subject_key}


def _received_data(
    request_id: str,
    kind: str,
    subject_key: str | None,
    status: str,
    records: int,
    received_at: datetime,
    due_at: datetime,
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "kind": kind,
        "subject_key": subject_key,
        "status": status,
        "records": records,
        "received_at": received_at.isoformat(),
        "due_at": due_at.isoformat(),
    }


def request_received(session: Session, req: DeletionRequest) -> None:
    emit(
        session,
        "request.received",
        _received_data(
            req.id,
            req.kind,
            req.subject_key,
            req.status,
            req.n_records,
            req.received_at,
            req.due_at,
        ),
    )


def requests_received(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """`request.received` for a group of new requests (intake's rows, the columns of
    `DeletionRequest`): one outbox row each, one statement and one fan-out task for all."""
    if not rows:
        return
    now = utcnow()
    events = [
        {
            "id": new_id(),
            "event_type": "request.received",
            "payload": {
                "type": "request.received",
                "timestamp": now.isoformat(),
                "data": _received_data(
                    r["id"],
                    r["kind"],
                    r["subject_key"],
                    r["status"],
                    r["n_records"],
                    r["received_at"],
                    r["due_at"],
                ),
            },
            "created_at": now,
            "deliveries": 0,
        }
        for r in rows
    ]
    bulk.insert_rows(session.connection(), cast(Table, WebhookEvent.__table__), events)
    enqueue(session, FAN_OUT_MANY_TASK, [e["id"] for e in events], queue=QUEUE)


def request_status_changed(
    session: Session, req: DeletionRequest, previous: str, data: dict[str, object]
) -> None:
    """`request.status_changed` on every transition, plus `request.completed` and
    `request.needs_review` when it reaches those. Only ids pass from `data` (free-text
    reasons and notes could hold personal data)."""
    extra = {k: v for k, v in data.items() if k in ("job_id", "report_id", "model")}
    base = _request_data(req)
    emit(session, "request.status_changed", {**base, "from": previous, "to": req.status, **extra})
    if req.status == "completed":
        done = req.completed_at.isoformat() if req.completed_at else None
        emit(session, "request.completed", {**base, "completed_at": done})
    elif req.status == "needs_review":
        emit(session, "request.needs_review", {**base, **extra})


def request_overdue(session: Session, req: DeletionRequest) -> None:
    """For the deadline watchdog."""
    emit(
        session,
        "request.overdue",
        {**_request_data(req), "status": req.status, "due_at": req.due_at.isoformat()},
    )


def model_promoted(
    session: Session, model: MLModel, previous: int | None, version: int, reason: str
) -> None:
    emit(
        session,
        "model.promoted",
        {
            "model": model.name,
            "model_id": model.id,
            "from_version": previous,
            "to_version": version,
            "reason": reason,
        },
    )


def job_failed(session: Session, job: Job, request_ids: list[str]) -> None:
    # The error text stays in the job (GET /v1/jobs): exception messages may quote data.
    emit(
        session,
        "job.failed",
        {
            "job_id": job.id,
            "kind": job.kind,
            "model_id": job.model_id,
            "request_ids": sorted(request_ids),
        },
    )
