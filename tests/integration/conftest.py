"""Real processes: `palimpsest api` + `palimpsest worker`, in two shapes.

- embedded: SQLite database, SQLite broker (kombu's SQLAlchemy transport), local files;
- production: PostgreSQL + Redis, when they answer (CI starts them; elsewhere the
  shape skips with the reason, unless PALIMPSEST_REQUIRE_SERVICES=1 makes that a failure).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from app.stack import LocalStack

pytestmark = pytest.mark.integration


def _reachable(url: str, default_port: int) -> bool:
    u = urlparse(url.replace("postgresql+psycopg", "postgresql"))
    try:
        with socket.create_connection(
            (u.hostname or "127.0.0.1", u.port or default_port), timeout=2
        ):
            return True
    except OSError:
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("PALIMPSEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def _postgres_database(admin_url: str) -> str:
    import psycopg

    name = f"palimpsest_it_{uuid.uuid4().hex[:10]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_postgres_database(admin_url: str, name: str) -> None:
    import psycopg

    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["embedded", "postgres-redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalStack]:
    env: dict[str, str] = {
        "PALIMPSEST_DEVICE": "cpu",
        "PALIMPSEST_TORCH_THREADS": "1",
        # The tests' webhook receivers listen on loopback, which is refused by default.
        "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    cleanup = None
    if request.param == "postgres-redis":
        pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", "")
        redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", "")
        if not pg or not _reachable(pg, 5432):
            _unavailable(
                f"PostgreSQL not reachable at {pg or '(PALIMPSEST_TEST_POSTGRES_URL unset)'}"
            )
        if not redis_url or not _reachable(redis_url, 6379):
            _unavailable(
                f"Redis not reachable at {redis_url or '(PALIMPSEST_TEST_REDIS_URL unset)'}"
            )
        name = _postgres_database(pg)
        base = pg.rsplit("/", 1)[0]
        # A private Redis database number per run keeps parallel runs apart.
        db_index = 1 + uuid.uuid4().int % 15
        env |= {
            # A server database is production: it refuses to start without secrets.
            "PALIMPSEST_SUBJECT_PEPPER": f"test-pepper-{uuid.uuid4().hex}",
            "PALIMPSEST_DASHBOARD_SESSION_SECRET": f"test-session-{uuid.uuid4().hex}",
            "PALIMPSEST_DATABASE_URL": f"{base}/{name}",
            "PALIMPSEST_BROKER_URL": f"{redis_url.rstrip('/')}/{db_index}",
            "PALIMPSEST_RESULT_BACKEND": f"{redis_url.rstrip('/')}/{db_index}",
        }

        def cleanup() -> None:
            _drop_postgres_database(pg, name)

    st = LocalStack(tmp_path / "stack", env=env)
    try:
        st.start()
        yield st
    finally:
        st.stop()
        if cleanup is not None:
            cleanup()
