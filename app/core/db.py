"""Engine and sessions. One engine per process; the unit-of-work owner commits.

Tasks enqueued during a unit of work are held on the session and sent only after the
transaction commits (and dropped on rollback), so a worker never sees an id whose rows
are not committed yet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.core import producers
from app.core.logging import HEADER as REQUEST_ID_HEADER
from app.core.logging import request_id_var
from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_application_name = "palimpsest"


def set_application_name(name: str) -> None:
    """How this process's PostgreSQL connections are named (pg_stat_activity); engines
    made before are disposed so that new connections carry the name."""
    global _application_name
    if name != _application_name:
        _application_name = name
        dispose_engines()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # API and worker processes share the file: WAL lets readers run beside one writer,
    # the busy timeout makes a writer wait instead of failing at once.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take it over so that
        # "BEGIN IMMEDIATE" below is honoured and writers serialise cleanly.
        event.listen(engine, "connect", lambda c, _r: setattr(c, "isolation_level", None))
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # pool_pre_ping: a connection the server dropped (restart, pg_terminate_backend,
    # a failover) is replaced on checkout instead of failing the next statement.
    connect_args = {"application_name": _application_name} if url.startswith("postgres") else {}
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=connect_args
    )


def get_engine(settings: Settings | None = None) -> Engine:
    url = (settings or get_settings()).database_url
    if url not in _engines:
        _engines[url] = make_engine(url)
    return _engines[url]


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    url = (settings or get_settings()).database_url
    if url not in _factories:
        _factories[url] = sessionmaker(get_engine(settings), expire_on_commit=False)
    return _factories[url]


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    _factories.clear()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """The unit of work for tasks and commands: commit on success, roll back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# -- tasks after commit ---------------------------------------------------------------


@dataclass(frozen=True)
class PendingTask:
    name: str
    args: tuple[Any, ...] = ()
    queue: str = "default"
    countdown: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = field(default_factory=lambda: request_id_var.get())


def enqueue(
    session: Session, name: str, *args: Any, queue: str = "default", countdown: float | None = None
) -> None:
    """Send Celery task `name` once this session's transaction commits."""
    session.info.setdefault("outbox", []).append(PendingTask(name, args, queue, countdown))


@event.listens_for(Session, "after_commit")
def _send_outbox(session: Session) -> None:
    session.info.pop("on_rollback", None)
    pending: list[PendingTask] = session.info.pop("outbox", [])
    if not pending:
        return
    from workers.celery_app import get_celery

    app = get_celery()
    for task in pending:
        _send(app, task)


# A broker that is down must not hold the caller (an HTTP request, a job's last step)
# for long: kombu would otherwise retry the connection without end. What cannot be
# sent within a few seconds is re-sent by the beat's resume sweep.
_SEND_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


def _send(app: Any, task: PendingTask, attempts: int = 3) -> None:
    """Publish on this thread's broker connection (app/core/producers.py). A transient
    failure is retried; a task that still cannot be sent is re-sent by the beat's resume
    sweep (tasks are idempotent)."""
    for attempt in range(1, attempts + 1):
        try:
            producers.publish(
                app,
                task.name,
                send={
                    "args": list(task.args),
                    "queue": task.queue,
                    "countdown": task.countdown,
                    "headers": {REQUEST_ID_HEADER: task.request_id} if task.request_id else None,
                    "retry_policy": _SEND_RETRY,
                    # Nobody waits on these results: no subscription to the result store
                    # (which would block on it too when Redis is down).
                    "ignore_result": True,
                },
            )
            return
        except Exception:
            if attempt == attempts:
                log.exception("could not send task %s%s; it will be resumed", task.name, task.args)


@event.listens_for(Session, "after_rollback")
def _drop_outbox(session: Session) -> None:
    session.info.pop("outbox", None)
    # Compensations for side effects outside the database (artifact bytes written).
    for undo in session.info.pop("on_rollback", []):
        try:
            undo()
        except Exception:
            log.exception("rollback compensation failed")
