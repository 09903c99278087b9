"""Publishing one task to the broker, for the outbox's Celery sender (workers/celery_app.py).

On Redis each thread keeps its broker connection and reuses it: opening one per task
cost a TCP connect and a Redis handshake for every accepted deletion request. A
connection is never shared: the API sends from its thread pool, and kombu's pooled
producers are not safe to share between threads on every transport. Other transports
(the embedded SQLAlchemy one) open a connection per task, as they always did.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

_local = threading.local()


def _reusable(app: Any) -> bool:
    return str(app.conf.broker_url or "").startswith(("redis://", "rediss://", "unix://"))


def _connection(app: Any) -> Any:
    """This thread's connection for `app`, made on first use (and again in a forked
    child, which must not write on its parent's socket)."""
    held = getattr(_local, "held", None)
    if held is not None and held[0] is app and held[1] == os.getpid():
        return held[2]
    conn = app.connection_for_write(connect_timeout=2, transport_options={"max_retries": 1})
    _local.held = (app, os.getpid(), conn)
    return conn


def _drop() -> None:
    held = getattr(_local, "held", None)
    _local.held = None
    if held is not None and held[1] == os.getpid():
        # A broken connection may fail to close; it is gone either way.
        with contextlib.suppress(Exception):
            held[2].release()


def publish(app: Any, name: str, *, send: dict[str, Any]) -> None:
    """`app.send_task(name, **send)` on a broker connection; raises what it raises (the
    caller retries), after dropping a connection that may be broken."""
    if not _reusable(app):
        with app.connection_for_write(
            connect_timeout=2, transport_options={"max_retries": 1}
        ) as conn:
            app.send_task(name, connection=conn, **send)
        return
    try:
        app.send_task(name, connection=_connection(app), **send)
    except Exception:
        _drop()
        raise
