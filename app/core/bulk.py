"""Many rows in one INSERT of fixed text (intake's groups).

SQLAlchemy sends a list of rows as an `executemany` (with psycopg, one Bind/Execute per
row in a pipeline) or, with RETURNING, as a multi-row VALUES whose text depends on the
row count and is parsed again by the driver for every group: together most of intake's
CPU. On PostgreSQL `insert_rows` sends each column as one array of text and lets the
server cast each back to its column's type (`unnest(...) WITH ORDINALITY`, in the list's
order, so a serial id follows the list): one statement of fixed text per table and
columns (which psycopg prepares after a few uses), whatever the row count, and one
conversion per value. Each value goes through its column type's bind processor first,
exactly as SQLAlchemy would send it, so what is stored is the same. Other databases take
SQLAlchemy's own path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from psycopg.types.json import Json, Jsonb
from sqlalchemy import Column, Connection, Table, insert, types
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

Convert = Callable[[Any], str | None]


def _as_text(value: Any) -> str | None:
    """A bound value as PostgreSQL's text input for its type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, Json | Jsonb):  # what SQLAlchemy's JSON type binds on psycopg
        return str((value.dumps or json.dumps)(value.obj))
    raise TypeError(f"no text form for a {type(value).__name__} value")


def _converter(column: Column[Any], dialect: Dialect) -> Convert:
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        return _as_text
    return lambda v: _as_text(process(v))


def _cast(column: Column[Any], dialect: Dialect) -> str:
    """How a text value becomes the column's: strings need no cast (a value too long for
    its column fails as it would in any insert), the others are cast to the type."""
    if isinstance(column.type, types.String) and not isinstance(column.type, types.JSON):
        return ""
    return "::" + column.type.compile(dialect)


@lru_cache(maxsize=64)
def _plan(
    table: Table, names: tuple[str, ...], conflict: tuple[str, ...], returning: str | None
) -> tuple[str, tuple[Convert, ...]]:
    dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
    prep = dialect.identifier_preparer
    cols = [table.c[n] for n in names]
    missing = [c.name for c in table.columns if c.default is not None and c.name not in set(names)]
    if missing:  # a Python-side default is not applied here: the caller supplies it
        raise ValueError(f"insert_rows into {table.name}: give {missing}")
    aliases = [f"c{i}" for i in range(len(cols))]
    into = ", ".join(prep.quote(c.name) for c in cols)
    values = ", ".join(f"u.{a}{_cast(c, dialect)}" for a, c in zip(aliases, cols, strict=True))
    # %b: each array goes in binary form (no per-element quoting on either side).
    arrays = ", ".join("%b::text[]" for _ in cols)
    sql = (
        f"INSERT INTO {prep.format_table(table)} ({into}) SELECT {values}"
        f" FROM unnest({arrays}) WITH ORDINALITY AS u({', '.join(aliases)}, ord) ORDER BY u.ord"
    )
    if conflict:
        sql += f" ON CONFLICT ({', '.join(prep.quote(n) for n in conflict)}) DO NOTHING"
    if returning is not None:
        sql += f" RETURNING {prep.quote(returning)}"
    return sql, tuple(_converter(c, dialect) for c in cols)


def insert_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    skip_conflicts_on: Sequence[str] = (),
    returning: str | None = None,
) -> list[Any]:
    """Insert `rows` (each with the same columns), in their order; with
    `skip_conflicts_on` (a unique index's columns) the rows that clash are left out;
    with `returning`, that column of each row inserted."""
    if not rows:
        return []
    names = tuple(rows[0])
    if conn.dialect.name != "postgresql":
        make = sqlite.insert if conn.dialect.name == "sqlite" else insert
        stmt: Any = make(table)
        if skip_conflicts_on:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(skip_conflicts_on))
        if returning is None:
            conn.execute(stmt, list(rows))
            return []
        return list(conn.execute(stmt.returning(table.c[returning]), list(rows)).scalars())
    sql, converters = _plan(table, names, tuple(skip_conflicts_on), returning)
    columns = tuple(
        [convert(r[n]) for r in rows] for n, convert in zip(names, converters, strict=True)
    )
    result = conn.exec_driver_sql(sql, columns)
    return list(result.scalars()) if returning is not None else []
