"""`app.core.bulk.insert_rows`: what it stores is what SQLAlchemy's own insert stores, in
the list's order, with conflicts skipped and the ids inserted returned; on PostgreSQL one
statement text whatever the row count. On SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError

from app.core.bulk import insert_rows
from app.models.base import UTCDateTime, new_id
from tests.support.database import backends, fresh_database, postgres_admin_url

BACKENDS = backends()

META = MetaData()
THINGS = Table(
    "bulk_things",
    META,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("owner", String(8)),
    Column("key", String(40)),
    Column("note", Text),
    Column("count", Integer),
    Column("flag", Boolean),
    Column("ratio", Float),
    Column("tags", JSON),
    Column("at", UTCDateTime),
    Column("chain", SmallInteger, server_default=text("0"), nullable=False),
    UniqueConstraint("owner", "key", name="uq_bulk_owner_key"),
)
DEFAULTED = Table(
    "bulk_defaulted",
    META,
    Column("id", String(32), primary_key=True, default=new_id),
    Column("note", Text),
)


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with fresh_database(tmp_path, request.param) as url:
        eng = create_engine(url)
        META.create_all(eng)
        try:
            yield eng
        finally:
            eng.dispose()


def _rows(n: int, prefix: str) -> list[dict[str, Any]]:
    t0 = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"{prefix}{i:05d}",
                "owner": "o1" if i % 3 else None,
                "key": f"{prefix}-k{i}",
                "note": None if i % 4 == 0 else f'line "{i}"\\ with, {{braces}} and\nnewline',
                "count": None if i % 5 == 0 else i * 7 - 3,
                "flag": None if i % 6 == 0 else bool(i % 2),
                "ratio": 0.1 * i + 1e-9,
                "tags": None if i % 2 else {"i": i, "names": ["a", "é", None], "ok": True},
                "at": None if i % 7 == 0 else t0 + timedelta(days=i, microseconds=i),
            }
        )
    return rows


def _stored(engine: Engine, prefix: str) -> list[tuple[Any, ...]]:
    cols = [c for c in THINGS.c if c.name != "seq"]
    with engine.connect() as conn:
        got = conn.execute(
            select(*cols, THINGS.c.tags.is_(None)).where(THINGS.c.id.like(f"{prefix}%"))
        ).all()
    return sorted(tuple(r) for r in got)


def test_stores_what_sqlalchemys_insert_stores(engine: Engine) -> None:
    ours, theirs = _rows(40, "a"), _rows(40, "b")
    with engine.begin() as conn:
        assert insert_rows(conn, THINGS, ours) == []
        conn.execute(insert(THINGS), theirs)
    mine = _stored(engine, "a")
    other = _stored(engine, "b")
    assert len(mine) == 40
    # The same values (ids and keys renamed), JSON nulls as SQLAlchemy stores them.
    rename = {"id": lambda v: v[1:], "key": lambda v: v[1:]}
    names = [c.name for c in THINGS.c if c.name != "seq"] + ["tags_is_null"]

    def norm(r: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(rename.get(n, lambda v: v)(v) for n, v in zip(names, r, strict=True))

    assert sorted(map(norm, mine)) == sorted(map(norm, other))
    at = {r[0]: r[names.index("at")] for r in mine}
    assert at["a00001"] == datetime(2026, 3, 5, 5, 6, 7, 891012, tzinfo=UTC)
    assert {r[names.index("chain")] for r in mine} == {0}  # the server default applies


def test_rows_go_in_in_the_lists_order(engine: Engine) -> None:
    rows = _rows(300, "o")
    rows.reverse()  # ids descending: the serial column must follow the list, not the ids
    with engine.begin() as conn:
        insert_rows(conn, THINGS, rows)
        got = conn.execute(select(THINGS.c.id).order_by(THINGS.c.seq)).scalars().all()
    assert got == [r["id"] for r in rows]


def test_conflicts_are_skipped_and_the_inserted_ids_returned(engine: Engine) -> None:
    first = _rows(10, "c")
    with engine.begin() as conn:
        got = insert_rows(conn, THINGS, first, skip_conflicts_on=("owner", "key"), returning="id")
        assert sorted(got) == sorted(r["id"] for r in first)
    again = _rows(10, "c")
    for r in again:
        r["id"] = "x" + r["id"]  # a new id, the same (owner, key) where owner is set
    with engine.begin() as conn:
        got = insert_rows(conn, THINGS, again, skip_conflicts_on=("owner", "key"), returning="id")
    # NULL owners never clash (a unique index ignores rows with a NULL).
    assert sorted(got) == sorted(r["id"] for r in again if r["owner"] is None)
    with engine.connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM bulk_things")).scalar_one()
    assert total == 10 + len(got)


def test_nothing_to_insert_sends_nothing(engine: Engine) -> None:
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    with engine.begin() as conn:
        assert insert_rows(conn, THINGS, [], returning="id") == []
    assert not [s for s in sent if "bulk_things" in s]


@pytest.mark.skipif(postgres_admin_url() is None, reason="PALIMPSEST_TEST_POSTGRES_URL is not set")
def test_on_postgresql_one_statement_text_whatever_the_row_count(tmp_path: Path) -> None:
    with fresh_database(tmp_path, "postgresql") as url:
        eng = create_engine(url)
        try:
            META.create_all(eng)
            sent: list[str] = []
            event.listen(eng, "before_cursor_execute", lambda *a: sent.append(a[2]))
            for n, prefix in ((1, "p"), (3, "q"), (120, "r")):
                with eng.begin() as conn:
                    insert_rows(conn, THINGS, _rows(n, prefix), returning="id")
            inserts = [s for s in sent if s.startswith("INSERT INTO bulk_things")]
            assert len(inserts) == 3 and len(set(inserts)) == 1
            # A value too long for its column fails as any insert would (not truncated).
            bad = _rows(1, "t")
            bad[0]["owner"] = "much too long"
            with pytest.raises(DBAPIError), eng.begin() as conn:
                insert_rows(conn, THINGS, bad)
            # A column whose default is Python's must be given, not silently left out.
            with pytest.raises(ValueError, match="give"), eng.begin() as conn:
                insert_rows(conn, DEFAULTED, [{"note": "x"}])
            # A value with no text form is refused before anything is sent.
            odd = _rows(1, "u")
            odd[0]["note"] = object()
            with pytest.raises(TypeError), eng.begin() as conn:
                insert_rows(conn, THINGS, odd)
            with eng.connect() as conn:
                left = conn.execute(
                    text("SELECT count(*) FROM bulk_things WHERE id LIKE 't%' OR id LIKE 'u%'")
                ).scalar_one()
            assert left == 0
        finally:
            eng.dispose()
