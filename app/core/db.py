"""Engine and sessions. One engine per process; the unit-of-work owner commits.

Tasks enqueued during a unit of work go through the outbox (`app.core.outbox`): held on
the session, sent after commit, dropped on rollback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

# By (database URL, ping on checkout).
_engines: dict[tuple[str, bool], Engine] = {}
_factories: dict[tuple[str, bool], sessionmaker[Session]] = {}
_application_name = "palimpsest"


def set_application_name(name: str) -> None:
    """How this process's PostgreSQL connections are named (pg_stat_activity); engines
    made before are disposed so that new connections carry the name."""
    global _application_name
    if name != _application_name:
        _application_name = name
        dispose_engines()


def _sqlite_pragmas(busy_ms: int) -> Callable[[Any, Any], None]:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        # API and worker processes share the file: WAL lets readers run beside one
        # writer, the busy timeout makes a writer wait instead of failing at once.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return apply


# How long a statement waits for a lock or a pooled connection when the caller does not
# say (the `database_busy_timeout_seconds` setting's default): migrations and scripts
# make engines from a URL alone, without the service's settings.
DEFAULT_BUSY_TIMEOUT = 30.0


def make_engine(
    url: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, pre_ping: bool = True
) -> Engine:
    """An engine for `url`; statements wait `busy_timeout` seconds for a lock or a pooled
    connection (`get_engine` passes the `database_busy_timeout_seconds` setting).
    `pre_ping=False` is for a caller that retries on a dropped connection itself."""
    wait = float(busy_timeout)
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": wait, "check_same_thread": False},
            pool_timeout=wait,
        )
        event.listen(engine, "connect", _sqlite_pragmas(int(wait * 1000)))
        # pysqlite's own transaction handling defers BEGIN; take it over so that
        # "BEGIN IMMEDIATE" below is honoured and writers serialise cleanly.
        event.listen(engine, "connect", lambda c, _r: setattr(c, "isolation_level", None))
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # pool_pre_ping: a connection the server dropped (restart, pg_terminate_backend,
    # a failover) is replaced on checkout instead of failing the next statement.
    connect_args = {"application_name": _application_name} if url.startswith("postgres") else {}
    return create_engine(
        url,
        pool_pre_ping=pre_ping,
        pool_size=5,
        max_overflow=10,
        pool_timeout=wait,
        connect_args=connect_args,
    )


def get_engine(settings: Settings | None = None, *, ping: bool = True) -> Engine:
    """The process's engine for the settings' database; `ping=False` a second one whose
    checkouts skip the liveness round trip (for a caller that retries on a dropped
    connection itself: intake's groups)."""
    settings = settings or get_settings()
    key = (settings.database_url, ping)
    if key not in _engines:
        _engines[key] = make_engine(
            settings.database_url, settings.database_busy_timeout_seconds, pre_ping=ping
        )
    return _engines[key]


def session_factory(
    settings: Settings | None = None, *, ping: bool = True
) -> sessionmaker[Session]:
    key = ((settings or get_settings()).database_url, ping)
    if key not in _factories:
        _factories[key] = sessionmaker(get_engine(settings, ping=ping), expire_on_commit=False)
    return _factories[key]


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    _factories.clear()


@contextmanager
def session_scope(settings: Settings | None = None, *, ping: bool = True) -> Iterator[Session]:
    """The unit of work for tasks and commands: commit on success, roll back on error."""
    session = session_factory(settings, ping=ping)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def refresh_statistics(session: Session, *tables: str) -> None:
    """On PostgreSQL, ANALYZE `tables` in this transaction (it counts the transaction's
    own rows). After a bulk insert the planner's statistics are stale until autovacuum
    gets round to it: with a freshly ingested `records` table estimated at a handful of
    rows, intake's count by subject key was planned as a scan of every live record."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"ANALYZE {', '.join(tables)}"))


# -- tasks after commit: see app.core.outbox ------------------------------------------


from app.core.outbox import PendingTask, enqueue, savepoint  # noqa: E402

__all__ = ["PendingTask", "enqueue", "savepoint"]
