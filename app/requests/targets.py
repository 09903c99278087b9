"""The one resolver from a request's target (a subject, records, a source) to the ids of
the records it covers that still exist: used by intake, planning and erasure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.core.chunks import in_chunks
from app.models import DeletionRequest, Record, Source, Subject

LIVE = ("active", "quarantined")


@dataclass(frozen=True)
class Target:
    kind: str  # subject | records | source | feature
    subject_key: str | None = None
    record_ids: tuple[str, ...] = ()  # external ids
    source: str | None = None
    dataset_id: str | None = None

    @classmethod
    def of(cls, req: DeletionRequest) -> Target:
        return cls(
            kind=req.kind,
            subject_key=req.subject_key,
            record_ids=tuple(req.record_ids or ()),
            source=req.source,
            dataset_id=req.dataset_id,
        )


def _owner(q: Select[Any], kind: str) -> tuple[Select[Any], Any]:
    """`q` over Record joined to what a subject or source target names, and the column
    that holds the name (a subject's key, a source's name)."""
    if kind == "subject":
        return q.join(Subject, Subject.id == Record.subject_id), Subject.subject_key
    return q.join(Source, Source.id == Record.source_id), Source.name


def _narrow(q: Select[Any], target: Target) -> Select[Any] | None:
    """`q` over Record restricted to the live records of a subject or source target."""
    if target.kind not in ("subject", "source"):
        return None
    joined, column = _owner(q, target.kind)
    value = target.subject_key if target.kind == "subject" else target.source
    return joined.where(column == value, Record.status.in_(LIVE))


def record_ids(session: Session, target: Target) -> list[int]:
    """Ids of the records `target` covers that still exist, sorted."""
    if target.kind == "records":
        return sorted(r for r, _, _ in matching_records(session, target))
    q = _narrow(select(Record.id), target)
    return [] if q is None else sorted(int(x) for x in session.scalars(q))


def count(session: Session, target: Target) -> int:
    if target.kind == "records":
        return len(matching_records(session, target))
    q = _narrow(select(func.count(Record.id)).select_from(Record), target)
    return 0 if q is None else int(session.scalar(q) or 0)


def count_many(session: Session, kind: str, values: set[str]) -> dict[str, int]:
    """`count` for many subject keys or source names at once: {value: live records};
    values holding none are absent."""
    if not values:
        return {}
    out: dict[str, int] = {}
    for chunk in in_chunks(sorted(values)):
        q, column = _owner(select(func.count(Record.id)).select_from(Record), kind)
        q = q.add_columns(column).where(column.in_(chunk), Record.status.in_(LIVE))
        rows = session.connection().execute(q.group_by(column))  # Core: no ORM loading
        out.update((str(v), int(n)) for n, v in rows)
    return out


def matching_records(session: Session, target: Target) -> list[tuple[int, str, str]]:
    """(id, external id, dataset id) of the live records a `records` target names."""
    out: list[tuple[int, str, str]] = []
    for chunk in in_chunks(sorted(set(target.record_ids))):
        q = select(Record.id, Record.external_id, Record.dataset_id).where(
            Record.external_id.in_(chunk), Record.status.in_(LIVE)
        )
        if target.dataset_id:
            q = q.where(Record.dataset_id == target.dataset_id)
        out.extend((int(a), str(b), str(c)) for a, b, c in session.execute(q))
    return out
