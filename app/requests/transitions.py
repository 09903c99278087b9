"""The write side of the request state machine: every status change goes through
`transition`, checked against the lifecycle (`states`), audited and announced."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.audit import service as audit
from app.integrations import service as integrations
from app.models import DeletionRequest
from app.models.base import utcnow
from app.requests import states
from app.webhooks import service as webhooks


def transition(
    session: Session,
    req: DeletionRequest,
    status: str,
    actor: str,
    *,
    reopen: bool = False,
    **data: object,
) -> None:
    """Every status change is checked against the lifecycle and is an audit event;
    `reopen` is an admin's retry of a failed request (`states.REOPEN`)."""
    if req.status == status:
        return
    if reopen:
        states.check_reopen(req.status, status)
    else:
        states.check(req.status, status)
    previous = req.status
    req.status = status
    if status == "completed":
        req.completed_at = utcnow()
    audit.record(
        session,
        actor=actor,
        action="request.status_changed",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"from": previous, "to": status, **data},
    )
    webhooks.request_status_changed(session, req, previous, data)
    # Integrations that wait on the request's end (a Fides callback) hear of it here.
    integrations.on_status(session, req, status)
