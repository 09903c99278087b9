from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from app.api.deps import ReaderDep, SessionDep
from app.audit import service
from app.models import AuditEvent

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("")
def list_events(
    _: ReaderDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[int | None, Query(ge=0, le=2**62)] = None,
) -> dict[str, Any]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
    if cursor is not None:
        q = q.where(AuditEvent.id < cursor)
    rows = session.scalars(q).all()
    items = [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "actor": e.actor,
            "action": e.action,
            "entity_type": e.entity_type,
            "entity_id": e.entity_id,
            "data": e.data,
            "hash": e.hash,
        }
        for e in rows[:limit]
    ]
    return {"items": items, "next_cursor": str(rows[limit - 1].id) if len(rows) > limit else None}


@router.get("/verify")
def verify(_: ReaderDep, session: SessionDep) -> dict[str, Any]:
    check = service.verify_chain(session)
    return {
        "intact": check.intact,
        "events": check.events,
        "first_bad_id": check.first_bad_id,
        "reason": check.reason,
    }
