"""Deletion requests that arrive with a platform's callback (Fides's `reply-to` and
`reply-to-token` headers): accepted like any other request (a subject nobody holds
completes with nothing to erase, so the platform's erasure is reported done with 0
rows), with the callback stored beside it (`app.integrations`)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.api.deps import Caller
from app.audit import service as audit
from app.core.errors import BadRequest, Unprocessable
from app.core.settings import Settings
from app.integrations import service, targets
from app.models import DeletionRequest
from app.requests import service as requests
from app.requests.schemas import DeletionRequestIn, RequestAccepted

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
    if not reply_to or not reply_to_token:
        raise BadRequest("Reply-To and Reply-To-Token come together", code="incomplete_callback")
    if len(reply_to_token) > MAX_TOKEN:
        raise BadRequest("Reply-To-Token is too long", code="invalid_callback")
    url = reply_to.strip()
    try:
        targets.check_url(url)
    except targets.UnsafeTarget as exc:
        raise Unprocessable(str(exc), code="callback_url_refused") from exc
    accepted, created = requests.create(session, body, caller, settings, idempotency_key)
    req = session.get(DeletionRequest, accepted.id)
    assert req is not None
    if created and req.kind == "subject" and req.n_records == 0:
        # The audit trail says nothing was held; the answer to the platform does not.
        audit.record(
            session,
            actor=caller.actor,
            action="integration.nothing_held",
            entity_type="deletion_request",
            entity_id=req.id,
            data={"kind": "fides", "external_ref": req.external_ref},
        )
    service.attach(session, req, "fides", url, reply_to_token.strip(), settings, caller.actor)
    return accepted, created
