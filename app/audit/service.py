"""Append-only, hash-chained audit log."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, event, inspect, select, text
from sqlalchemy.orm import Session

from app.core import bulk
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


# PostgreSQL writers append to one of CHAINS chains. One chain serialises every writer
# from its append to its commit (the next writer must see the predecessor's hash), and a
# commit waits for its WAL flush: a single chain caps intake at one fsync per request.
# With several, concurrent transactions commit together (PostgreSQL's group commit).
# Within a chain the order is the id order (ids are drawn under the chain's lock); across
# chains it is the hashed timestamps'. SQLite has one writer at a time: chain 0 only.
CHAINS = 16
_LOCK = 7316001  # the advisory lock space: (_LOCK, chain)
_CHAIN_KEY = "audit_chain"


def _chain(session: Session) -> int:
    """This transaction's chain, locked until it ends: the lowest free one (so a lone
    writer always appends to chain 0, and more chains fill only under concurrency), else
    wait for a random one. A transaction waits only while it holds no chain lock, and
    holds one at most, so chain locks never deadlock."""
    chain: int | None = session.info.get(_CHAIN_KEY)
    if chain is not None:
        return chain
    if session.get_bind().dialect.name != "postgresql":
        chain = 0
    else:
        chain = session.scalar(
            text(
                "SELECT c FROM unnest(CAST(:chains AS integer[])) AS c"
                " WHERE pg_try_advisory_xact_lock(:lock, c) LIMIT 1"
            ),
            {"chains": list(range(CHAINS)), "lock": _LOCK},
        )
        if chain is None:
            chain = secrets.randbelow(CHAINS)
            session.execute(
                text("SELECT pg_advisory_xact_lock(:lock, :c)"), {"lock": _LOCK, "c": chain}
            )
    session.info[_CHAIN_KEY] = chain
    return chain


_LAST_KEY = "audit_last"


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_rollback")
def _release_chain(session: Session) -> None:
    # The transaction's advisory lock ended with it; the next one picks again.
    session.info.pop(_CHAIN_KEY, None)
    session.info.pop(_LAST_KEY, None)


def _last_hash(session: Session, chain: int) -> str:
    """The hash of the chain's last event. While this transaction holds the chain (its
    lock, or SQLite's one writer) nobody else appends to it, so after its first event
    the last one is the one it appended itself, unless a savepoint rolled it back (then
    it is gone from the session, and the chain is read again)."""
    mine: AuditEvent | None = session.info.get(_LAST_KEY)
    state = inspect(mine) if mine is not None else None
    live = state is not None and (state.pending or state.persistent)
    if mine is not None and live and mine.chain == chain:
        return mine.hash
    last = session.scalar(
        select(AuditEvent.hash)
        .where(AuditEvent.chain == chain)
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    return last if last is not None else GENESIS


@dataclass(frozen=True)
class Entry:
    """One event to append (`record_many`)."""

    actor: str
    action: str
    entity_type: str
    entity_id: str
    data: dict[str, Any] | None = None


def _chained(prev: str, chain: int, entry: Entry) -> dict[str, Any]:
    """The event's columns, its hash chained to `prev`."""
    at = utcnow()
    payload = json.loads(json.dumps(entry.data or {}, default=str))
    return {
        "at": at,
        "actor": entry.actor,
        "action": entry.action,
        "entity_type": entry.entity_type,
        "entity_id": entry.entity_id,
        "data": payload,
        "prev_hash": prev,
        "hash": _digest(
            prev, at, entry.actor, entry.action, entry.entity_type, entry.entity_id, payload
        ),
        "chain": chain,
    }


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event chained to the last one of this transaction's chain."""
    chain = _chain(session)
    entry = Entry(actor, action, entity_type, entity_id, data)
    ev = AuditEvent(**_chained(_last_hash(session, chain), chain, entry))
    # Not flushed here: a transaction's events go in with its next flush, in the order
    # they were added (the ORM inserts a table's new rows in that order, and SQLAlchemy
    # has PostgreSQL draw their ids in that order too), which is the chain's order.
    session.add(ev)
    session.info[_LAST_KEY] = ev
    return ev


def record_many(session: Session, entries: Sequence[Entry]) -> None:
    """Append events in the given order, each chained to the one before, in one
    statement (intake's groups: one chain lock and one read of the chain's end for all).
    The rows' ids follow the list's order, so the chain's order is the id order."""
    if not entries:
        return
    chain = _chain(session)
    session.flush()  # events `record` added earlier in this transaction come first
    prev = _last_hash(session, chain)
    rows = []
    for entry in entries:
        rows.append(_chained(prev, chain, entry))
        prev = rows[-1]["hash"]
    # Core: no ORM work per row. The chain's last event is now one the session does
    # not hold: the next `record` reads it back.
    bulk.insert_rows(session.connection(), cast(Table, AuditEvent.__table__), rows)
    session.info.pop(_LAST_KEY, None)


@dataclass
class ChainCheck:
    intact: bool
    events: int
    first_bad_id: int | None = None
    reason: str | None = None


def verify_chain(session: Session, batch: int = 5000) -> ChainCheck:
    """Recompute every hash in order, each chain from its genesis; report the first
    event that does not match."""
    prev: dict[int, str] = {}
    count = 0
    last_id = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)
        ).all()
        if not rows:
            return ChainCheck(True, count)
        for ev in rows:
            if ev.prev_hash != prev.get(ev.chain, GENESIS):
                return ChainCheck(
                    False, count, ev.id, "prev_hash does not match the previous event"
                )
            expected = _digest(
                ev.prev_hash, ev.at, ev.actor, ev.action, ev.entity_type, ev.entity_id, ev.data
            )
            if expected != ev.hash:
                return ChainCheck(False, count, ev.id, "event content does not match its hash")
            prev[ev.chain] = ev.hash
            count += 1
            last_id = ev.id
