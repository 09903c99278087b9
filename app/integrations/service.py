"""Callbacks stored with requests, and the one hook every status change passes through.

A callback row is an outbox: it is written in the request's own transaction and its
delivery task is sent only after commit, so a rolled-back completion reports nothing.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import enqueue
from app.core.settings import Settings
from app.integrations import sealing
from app.integrations.schemas import CallbackOut
from app.models import DeletionRequest
from app.models.base import utcnow
from app.models.integrations import RequestCallback

DELIVER_TASK = "palimpsest.deliver_integration_callback"
SYSTEM = "integrations"
# Ends that Fides's callback cannot express: its body only says how many rows were
# masked, and any call to it marks the task done. Reporting these would tell Fides the
# data is gone when it is not, so nothing is sent and the request shows why.
WITHHELD = frozenset({"failed", "rejected", "cancelled"})


def _of(session: Session, request_id: str) -> RequestCallback | None:
    return session.scalars(
        select(RequestCallback).where(RequestCallback.request_id == request_id)
    ).first()


def attach(
    session: Session,
    req: DeletionRequest,
    kind: str,
    url: str,
    token: str,
    settings: Settings,
    actor: str,
) -> RequestCallback:
    """Store (or, on a replayed intake, replace) the request's callback. A replay with a
    new token (Fides re-ran its task, which waits again) of a request that already ended
    reports that end again; the very same call repeated changes nothing."""
    cb = _of(session, req.id)
    now = utcnow()
    if cb is not None and cb.status == "delivered" and cb.url == url:
        with contextlib.suppress(ValueError, InvalidTag):
            if sealing.unseal(cb.token_sealed, settings.pepper, req.id) == token:
                return cb  # the same call again (a network retry): already answered
    if cb is None:
        cb = RequestCallback(request_id=req.id, kind=kind, created_at=now)
        session.add(cb)
    cb.url = url
    cb.token_sealed = sealing.seal(token, settings.pepper, req.id)
    cb.updated_at = now
    cb.status = "waiting"
    cb.failures = 0
    cb.next_attempt_at = None
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="integration.callback_registered",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"kind": kind, "host": urlsplit(url).hostname},
    )
    if req.status == "completed" or req.status in WITHHELD:
        _settle(session, req, cb, req.status)
    return cb


def on_status(session: Session, req: DeletionRequest, status: str) -> None:
    """Called by `transition` for every status change of every request."""
    if status != "completed" and status not in WITHHELD:
        return
    cb = _of(session, req.id)
    if cb is not None:
        _settle(session, req, cb, status)


def _settle(session: Session, req: DeletionRequest, cb: RequestCallback, status: str) -> None:
    now = utcnow()
    cb.updated_at = now
    if status == "completed":
        cb.status = "pending"
        cb.rows_masked = req.n_records
        cb.failures = 0
        cb.last_error = None
        cb.next_attempt_at = now
        enqueue(session, DELIVER_TASK, cb.id)
        return
    cb.status = "withheld"
    cb.next_attempt_at = None
    cb.last_error = (
        f"the request ended {status}; the {cb.kind} callback can only report a completed "
        "erasure, so none was sent"
    )
    audit.record(
        session,
        actor=SYSTEM,
        action="integration.callback_withheld",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"kind": cb.kind, "request_status": status},
    )


def view(session: Session, req: DeletionRequest) -> CallbackOut | None:
    cb = _of(session, req.id)
    if cb is None:
        return None
    return CallbackOut(
        kind=cb.kind,
        status=cb.status,
        attempts=cb.attempts,
        last_error=cb.last_error,
        rows_masked=cb.rows_masked,
        target=urlsplit(cb.url).hostname or "",
        next_attempt_at=cb.next_attempt_at if cb.status == "pending" else None,
        delivered_at=cb.delivered_at,
    )
