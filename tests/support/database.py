"""Fresh databases for tests: a SQLite file by default, PostgreSQL when asked.

Set `PALIMPSEST_TEST_POSTGRES_URL` (an admin URL such as
`postgresql+psycopg://postgres@127.0.0.1:5432/test`) to run the same tests against a
brand-new PostgreSQL database created on that server and dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

POSTGRES_ENV = "PALIMPSEST_TEST_POSTGRES_URL"


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def backends() -> list[Any]:
    """`sqlite`, and `postgresql` unless PALIMPSEST_TEST_POSTGRES_URL is unset (then
    skipped with that reason): a backend fixture's params."""
    import pytest

    skip = pytest.mark.skipif(postgres_admin_url() is None, reason=f"{POSTGRES_ENV} is not set")
    return ["sqlite", pytest.param("postgresql", marks=skip)]


def _psycopg_dsn(url: str) -> str:
    # psycopg does not understand SQLAlchemy's "+driver" suffix.
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def postgres_database(admin_url: str, prefix: str = "palimpsest_test") -> Iterator[str]:
    """Create an empty database on the admin URL's server; yield its SQLAlchemy URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_psycopg_dsn(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_psycopg_dsn(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(folder: Path, backend: str | None = None) -> Iterator[str]:
    """Yield the URL of an empty database: `sqlite` (default) or `postgresql`.

    With `backend=None` the choice follows `PALIMPSEST_TEST_POSTGRES_URL`.
    """
    admin = postgres_admin_url()
    if backend is None:
        backend = "postgresql" if admin else "sqlite"
    if backend == "sqlite":
        folder.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{folder / 'palimpsest.sqlite'}"
        return
    if not admin:
        raise RuntimeError(f"{POSTGRES_ENV} is not set")
    with postgres_database(admin) as url:
        yield url
