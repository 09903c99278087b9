"""Deletion requests that arrive with a platform's callback (Fides's `reply-to` and
`reply-to-token` headers).

A platform asks on behalf of whoever filed the privacy request, without knowing whether
Palimpsest holds anything for them. A subject nobody holds is therefore accepted like
any other request and completes with nothing to erase, so the platform's erasure is
reported done with 0 rows instead of failing (API.md states this for every portal; until
the general intake does it, this path does).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.deps import Caller
from app.audit import service as audit
from app.core.db import enqueue
from app.core.errors import BadRequest, Conflict, NotFound, Unprocessable
from app.core.security import subject_key
from app.core.settings import Settings
from app.integrations import service, targets
from app.models import DeletionRequest
from app.models.base import utcnow
from app.requests.schemas import DeletionRequestIn, RequestAccepted
from app.webhooks import service as webhooks

MAX_TOKEN = 8192


def create_with_callback(
    session: Session,
    body: DeletionRequestIn,
    caller: Caller,
    settings: Settings,
    idempotency_key: str | None,
    reply_to: str | None,
    reply_to_token: str | None,
) -> tuple[RequestAccepted, bool]:
    from app.requests import service as requests

    if not reply_to or not reply_to_token:
        raise BadRequest("Reply-To and Reply-To-Token come together", code="incomplete_callback")
    if len(reply_to_token) > MAX_TOKEN:
        raise BadRequest("Reply-To-Token is too long", code="invalid_callback")
    url = reply_to.strip()
    try:
        targets.check_url(url)
    except targets.UnsafeTarget as exc:
        raise Unprocessable(str(exc), code="callback_url_refused") from exc
    try:
        accepted, created = requests.create(session, body, caller, settings, idempotency_key)
    except NotFound as exc:
        if exc.code != "subject_not_found":
            raise
        accepted, created = _accept_unheld(session, body, caller, settings, idempotency_key)
    req = session.get(DeletionRequest, accepted.id)
    assert req is not None
    service.attach(session, req, "fides", url, reply_to_token.strip(), settings, caller.actor)
    return accepted, created


def _accept_unheld(
    session: Session,
    body: DeletionRequestIn,
    caller: Caller,
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[RequestAccepted, bool]:
    """A subject request for someone Palimpsest holds nothing of: planned like any other
    (the lifecycle finds no records and no models, erases nothing and certifies that)."""
    assert body.subject_id is not None
    now = utcnow()
    req = DeletionRequest(
        kind=body.kind,
        status="received",
        subject_key=subject_key(body.subject_id, settings.subject_pepper),
        model_name=body.model,
        reason=body.reason,
        external_ref=body.external_ref,
        api_key_id=caller.key_id,
        idempotency_key=idempotency_key,
        received_at=now,
        due_at=now + timedelta(days=settings.deadline_days),
        n_records=0,
    )
    session.add(req)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(
            "a request with this Idempotency-Key is being created", code="idempotency_conflict"
        ) from exc
    audit.record(
        session,
        actor=caller.actor,
        action="request.received",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"kind": req.kind, "records": 0, "due_at": req.due_at.isoformat()},
    )
    # The audit trail says nothing was held; the answer to the caller does not.
    audit.record(
        session,
        actor=caller.actor,
        action="integration.nothing_held",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"kind": "fides", "external_ref": req.external_ref},
    )
    webhooks.request_received(session, req)
    enqueue(session, "palimpsest.plan_request", req.id)
    return RequestAccepted(
        id=req.id, status=req.status, received_at=req.received_at, due_at=req.due_at
    ), True
