"""Tasks after commit: the unit of work's outbox.

Tasks enqueued during a unit of work are held on the session and sent only after the
transaction commits (and dropped on rollback), so a worker never sees an id whose rows
are not committed yet. How a task is actually sent is not this module's business: the
Celery app registers a sender when a process starts (`register_sender`), so the core
depends on nothing above it. A process with no sender keeps its tasks for the beat's
resume sweep, which re-sends lost work from the database (tasks are idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.core.logging import request_id_var

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingTask:
    name: str
    args: tuple[Any, ...] = ()
    queue: str = "default"
    countdown: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = field(default_factory=lambda: request_id_var.get())
    # A task that takes a list of what this one takes as its one argument: several of
    # these sent by one commit go as one such task (`coalesce`).
    batch: str | None = None


class TaskSender(Protocol):
    """What a broker client provides: one task, or a group joined by a callback."""

    def send(self, task: PendingTask) -> None: ...

    def chord(self, header: Sequence[PendingTask], callback: PendingTask) -> None: ...


_sender: TaskSender | None = None


def register_sender(sender: TaskSender) -> None:
    """Install the process's task sender (the Celery app does, at start-up)."""
    global _sender
    _sender = sender


def sender() -> TaskSender:
    if _sender is None:
        raise RuntimeError("no task sender is registered in this process")
    return _sender


def enqueue(
    session: Session,
    name: str,
    *args: Any,
    queue: str = "default",
    countdown: float | None = None,
    batch: str | None = None,
) -> None:
    """Send task `name` once this session's transaction commits. With `batch` (the name
    of a task taking a list of `name`'s single argument), several such tasks of one
    commit are sent as one `batch` task."""
    session.info.setdefault("outbox", []).append(
        PendingTask(name, args, queue, countdown, batch=batch)
    )


# The most ids one coalesced task carries.
BATCH_MAX = 500


def coalesce(tasks: Sequence[PendingTask]) -> list[PendingTask]:
    """`tasks` with those that name a `batch` task, one argument each, merged: per batch
    task, queue, countdown and request id, two or more become `batch` tasks of at most
    `BATCH_MAX` ids (in their order, at the place of the first); a lone one stays."""
    groups: dict[tuple[str, str, float | None, str | None], list[PendingTask]] = {}
    for t in tasks:
        if t.batch is not None and len(t.args) == 1 and not t.kwargs:
            groups.setdefault((t.batch, t.queue, t.countdown, t.request_id), []).append(t)
    out: list[PendingTask] = []
    done: set[tuple[str, str, float | None, str | None]] = set()
    for t in tasks:
        key = (t.batch or "", t.queue, t.countdown, t.request_id)
        members = groups.get(key) if t.batch is not None else None
        if members is None or len(members) < 2:
            out.append(t)
            continue
        if key in done:
            continue
        done.add(key)
        items = list(dict.fromkeys(m.args[0] for m in members))
        for i in range(0, len(items), BATCH_MAX):
            out.append(
                PendingTask(
                    key[0],
                    (items[i : i + BATCH_MAX],),
                    t.queue,
                    t.countdown,
                    request_id=t.request_id,
                )
            )
    return out


def on_rollback(session: Session, undo: Callable[[], None]) -> None:
    """Compensate a side effect outside the database (artifact bytes written) if the
    transaction rolls back."""
    session.info.setdefault("on_rollback", []).append(undo)


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """A nested transaction whose failure also forgets the tasks enqueued inside it, while
    the outer transaction (and what it enqueued before) stays usable."""
    outbox = list(session.info.get("outbox", []))
    try:
        with session.begin_nested():
            yield
    except BaseException:
        session.info["outbox"] = outbox
        raise


_HELD = "outbox_held"


def hold(session: Session, into: list[PendingTask]) -> None:
    """At its commit, put the tasks this session's transaction enqueued in `into`
    instead of sending them: the caller sends them with `send_all` when it chooses
    (intake: after answering the requests they belong to). A rollback drops them."""
    session.info[_HELD] = into


def send_all(tasks: Sequence[PendingTask]) -> None:
    """Send tasks (a sender's failures are its own to log; the resume sweep re-sends)."""
    if not tasks:
        return
    if _sender is None:
        log.error("no task sender registered: %d task(s) left to the resume sweep", len(tasks))
        return
    for task in tasks:
        _sender.send(task)


@event.listens_for(Session, "after_commit")
def _send_outbox(session: Session) -> None:
    session.info.pop("on_rollback", None)
    pending: list[PendingTask] = session.info.pop("outbox", [])
    held: list[PendingTask] | None = session.info.pop(_HELD, None)
    if held is not None:
        held.extend(coalesce(pending))
        return
    send_all(coalesce(pending))


@event.listens_for(Session, "after_rollback")
def _drop_outbox(session: Session) -> None:
    session.info.pop("outbox", None)
    session.info.pop(_HELD, None)
    for undo in session.info.pop("on_rollback", []):
        try:
            undo()
        except Exception:
            log.exception("rollback compensation failed")
