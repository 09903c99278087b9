"""The deadline watchdog (GDPR Art. 12(3): one month, extendable once by two).

Run by `palimpsest beat`: every open request due within the warning window is announced
once as `request.due_soon`, and once more as `request.overdue` when its deadline passes.
Announcements are audit events (and webhook events where subscribed); the audit log is
also what makes each announcement happen only once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.models import AuditEvent, DeletionRequest
from app.models.base import utcnow
from app.requests.states import TERMINAL
from app.webhooks import service as webhooks

WATCHDOG = "watchdog"


def _announced(session: Session, request_id: str, action: str) -> bool:
    return (
        session.scalars(
            select(AuditEvent.id).where(
                AuditEvent.entity_id == request_id, AuditEvent.action == action
            )
        ).first()
        is not None
    )


def sweep(session: Session, warn_days: float, now: datetime | None = None) -> dict[str, int]:
    """Announce what is near or past its deadline; returns how many of each were new."""
    now = now or utcnow()
    horizon = now + timedelta(days=warn_days)
    counts = {"due_soon": 0, "overdue": 0}
    open_requests = session.scalars(
        select(DeletionRequest)
        .where(DeletionRequest.status.not_in(TERMINAL), DeletionRequest.due_at <= horizon)
        .order_by(DeletionRequest.due_at)
    ).all()
    for req in open_requests:
        overdue = req.due_at <= now
        action = "request.overdue" if overdue else "request.due_soon"
        if _announced(session, req.id, action):
            continue
        data: dict[str, Any] = {
            "status": req.status,
            "due_at": req.due_at.isoformat(),
            "hours_left": round((req.due_at - now).total_seconds() / 3600, 1),
        }
        audit.record(
            session,
            actor=WATCHDOG,
            action=action,
            entity_type="deletion_request",
            entity_id=req.id,
            data=data,
        )
        if overdue:
            webhooks.request_overdue(session, req)
        counts["overdue" if overdue else "due_soon"] += 1
    return counts
