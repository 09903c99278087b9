"""Append-only, hash-chained audit log."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.models import AuditEvent
from app.models.base import utcnow

GENESIS = "0" * 64


def _digest(
    prev: str, at: datetime, actor: str, action: str, etype: str, eid: str, data: Any
) -> str:
    body = json.dumps(
        {
            "prev": prev,
            "at": at.isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "entity_type": etype,
            "entity_id": eid,
            "data": data,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event chained to the last one. Writers are serialised so the chain
    never forks: a transaction-scoped advisory lock on PostgreSQL; SQLite's write lock
    (every transaction begins IMMEDIATE) does the same there."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(7316001)"))
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).first()
    prev = last.hash if last is not None else GENESIS
    at = utcnow()
    payload = json.loads(json.dumps(data or {}, default=str))
    event = AuditEvent(
        at=at,
        actor=actor,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        data=payload,
        prev_hash=prev,
        hash=_digest(prev, at, actor, action, entity_type, entity_id, payload),
    )
    session.add(event)
    session.flush()
    return event


@dataclass
class ChainCheck:
    intact: bool
    events: int
    first_bad_id: int | None = None
    reason: str | None = None


def verify_chain(session: Session, batch: int = 5000) -> ChainCheck:
    """Recompute every hash in order; report the first event that does not match."""
    prev = GENESIS
    count = 0
    last_id = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)
        ).all()
        if not rows:
            return ChainCheck(True, count)
        for ev in rows:
            if ev.prev_hash != prev:
                return ChainCheck(
                    False, count, ev.id, "prev_hash does not match the previous event"
                )
            expected = _digest(
                prev, ev.at, ev.actor, ev.action, ev.entity_type, ev.entity_id, ev.data
            )
            if expected != ev.hash:
                return ChainCheck(False, count, ev.id, "event content does not match its hash")
            prev = ev.hash
            count += 1
            last_id = ev.id
