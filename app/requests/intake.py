"""Intake of deletion requests in groups (`POST /v1/deletion-requests`).

One transaction per request caps intake at what a transaction costs: on PostgreSQL
about ten statements, an audit-chain lock, a WAL flush and two broker messages each,
some 9 ms of API CPU per request. Here each API process has one writer thread; the
requests that arrive while it writes wait (each its HTTP call, as a future) and go into
its next group, which is one transaction: the keys' revocation checked for all, their
records counted in one query per kind, one multi-row insert of the requests (`ON
CONFLICT DO NOTHING` on the Idempotency-Key, so a concurrent retry waits for its twin
and is answered as a replay), one chain lock and one insert for their audit events, one
insert for their webhook events, one commit. A reply leaves only after its group has
committed, so a 202 means what it meant before: the request is stored, and planning
is on its way.

Ordinary requests (a subject, records or a source, with no platform callback) take the
group path. A feature request, one with a callback, and each request of a group that
failed for any reason but a busy database go through `service.create`, one transaction
each, which gives each its own exact answer. A busy database fails the whole group
with the error the API turns into 503. Two requests of one group with the same key go
in successive groups, so the second is a replay of the first.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import Caller
from app.audit import service as audit
from app.core import bulk, outbox
from app.core.db import enqueue, session_scope
from app.core.errors import AppError, Conflict, Unauthorized
from app.core.outbox import PendingTask
from app.core.security import subject_key
from app.core.settings import Settings
from app.models import ApiKey, DeletionRequest
from app.requests import callbacks, service, targets
from app.requests.schemas import DeletionRequestIn, RequestAccepted
from app.webhooks import service as webhooks

log = logging.getLogger(__name__)

Accepted = tuple[RequestAccepted, bool]
# At most this many requests per transaction (a group's statements stay small).
MAX_GROUP = 256
# Writer threads per process: while one group waits on its commit, the next is written.
WRITER_THREADS = 1
# How long, at most, a writer waits for more requests when several are arriving at once.
LINGER_SECONDS = 0.004
# "Busy": the writer's previous group ended less than this long before the next request.
BUSY_SECONDS = 0.010
# PostgreSQL's deadlock and serialisation failures: the group is simply run again.
_TRANSIENT = {"40P01", "40001"}
# One planning task for a whole group (workers/tasks.py).
PLAN_TASK = "palimpsest.plan_requests"


@dataclass(eq=False)
class Ticket:
    """One waiting request."""

    body: DeletionRequestIn
    caller: Caller
    settings: Settings
    idempotency_key: str | None
    future: Future[Accepted] = field(default_factory=Future)

    @property
    def key(self) -> tuple[str, str] | None:
        if self.idempotency_key is None:
            return None
        return (self.caller.key_id, self.idempotency_key)


def groupable(body: DeletionRequestIn, reply_to: str | None, reply_to_token: str | None) -> bool:
    return (
        body.kind in ("subject", "records", "source")
        and reply_to is None
        and reply_to_token is None
        and (body.dataset_id is None or body.kind == "records")
    )


def _busy(exc: BaseException) -> bool:
    """An error the API answers with 503 (app.main): the database, not the group."""
    if isinstance(exc, PoolTimeoutError | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _transient(exc: BaseException) -> bool:
    """Worth one more try: a deadlock or serialisation failure, or a connection the
    server had dropped (intake's engine does not ping on checkout; SQLAlchemy then
    discards the pool's connections, so the second try gets a fresh one)."""
    if not isinstance(exc, DBAPIError):
        return False
    return exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) in _TRANSIENT


def _session(settings: Settings) -> AbstractContextManager[Session]:
    """The group's transaction; on PostgreSQL without a ping on checkout (a round trip
    of a group's eight or so): a dropped connection fails the group, which runs once
    more (`_transient`)."""
    postgres = settings.database_url.startswith("postgresql")
    return session_scope(settings, ping=not postgres)


def _settle(future: Future[Accepted], outcome: Accepted | BaseException) -> None:
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # the caller went away (its future was cancelled)
        pass


def _live(session: Session, caller: Caller) -> None:
    row = session.execute(select(ApiKey.revoked_at).where(ApiKey.id == caller.key_id)).first()
    if row is None or row[0] is not None:
        raise Unauthorized("unknown or revoked API key")


def create_alone(
    body: DeletionRequestIn,
    caller: Caller,
    settings: Settings,
    idempotency_key: str | None,
    reply_to: str | None = None,
    reply_to_token: str | None = None,
) -> Accepted:
    """One request in a transaction of its own (the key checked in it, as in a group)."""
    with session_scope(settings) as s:
        _live(s, caller)
        if reply_to is not None or reply_to_token is not None:
            return callbacks.create_with_callback(
                s, body, caller, settings, idempotency_key, reply_to, reply_to_token
            )
        return service.create(s, body, caller, settings, idempotency_key)


def _counts(session: Session, tickets: Sequence[Ticket], keys: dict[int, str]) -> dict[int, int]:
    """Live records each request's target covers now: one query per kind."""
    by_subject = targets.count_many(session, "subject", set(keys.values()))
    sources = {t.body.source for t in tickets if t.body.kind == "source" and t.body.source}
    by_source = targets.count_many(session, "source", sources)
    out: dict[int, int] = {}
    for t in tickets:
        if t.body.kind == "subject":
            out[id(t)] = by_subject.get(keys[id(t)], 0)
        elif t.body.kind == "source":
            out[id(t)] = by_source.get(t.body.source or "", 0)
        else:  # records: not looked up at intake (planning resolves the ids, in steps)
            out[id(t)] = 0
    return out


def _insert(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the rows, skipping those whose Idempotency-Key is taken; the ids inserted."""
    table: Any = DeletionRequest.__table__
    ids = bulk.insert_rows(
        session.connection(),
        table,
        rows,
        skip_conflicts_on=("api_key_id", "idempotency_key"),
        returning="id",
    )
    return {str(x) for x in ids}


def _priors(session: Session, tickets: Sequence[Ticket]) -> dict[tuple[str, str], DeletionRequest]:
    wanted = [t.key for t in tickets if t.key is not None]
    if not wanted:
        return {}
    q = select(DeletionRequest).where(
        tuple_(DeletionRequest.api_key_id, DeletionRequest.idempotency_key).in_(wanted)
    )
    return {(str(r.api_key_id), str(r.idempotency_key)): r for r in session.scalars(q)}


def write_group(
    tickets: Sequence[Ticket], tasks: list[PendingTask] | None = None
) -> dict[int, Accepted | AppError]:
    """Store a group of requests in one transaction (distinct Idempotency-Keys, one
    database); each ticket's answer, by `id(ticket)`. The tasks it enqueues are sent at
    commit, or with `tasks` kept there for the caller to send."""
    settings = tickets[0].settings
    out: dict[int, Accepted | AppError] = {}
    with _session(settings) as s:
        if tasks is not None:
            outbox.hold(s, tasks)
        key_ids = {t.caller.key_id for t in tickets}
        # Core statements on the transaction's connection: no ORM loading per row.
        conn = s.connection()
        live = set(
            conn.scalars(
                select(ApiKey.id).where(ApiKey.id.in_(key_ids), ApiKey.revoked_at.is_(None))
            )
        )
        todo = []
        for t in tickets:
            if t.caller.key_id in live:
                todo.append(t)
            else:
                out[id(t)] = Unauthorized("unknown or revoked API key")
        # One order for every group's inserts, so that two groups waiting on each
        # other's keys cannot deadlock.
        todo.sort(key=lambda t: (t.caller.key_id, t.idempotency_key or ""))
        keys = {
            id(t): subject_key(t.body.subject_id, t.settings.pepper)
            for t in todo
            if t.body.kind == "subject" and t.body.subject_id is not None
        }
        counts = _counts(s, todo, keys)
        rows = [
            service.request_row(
                t.body, t.caller, t.settings, t.idempotency_key, keys.get(id(t)), counts[id(t)]
            )
            for t in todo
        ]
        inserted = _insert(s, rows)
        new = [(t, r) for t, r in zip(todo, rows, strict=True) if r["id"] in inserted]
        clashed = [t for t, r in zip(todo, rows, strict=True) if r["id"] not in inserted]
        priors = _priors(s, clashed)
        for t in clashed:
            prior = priors.get(t.key) if t.key is not None else None
            if prior is None:  # not visible yet: the client retries, as it always could
                out[id(t)] = Conflict(
                    "a request with this Idempotency-Key is being created",
                    code="idempotency_conflict",
                )
                continue
            try:
                out[id(t)] = (service.replay(prior, t.body, t.settings), False)
            except Conflict as exc:
                out[id(t)] = exc
        audit.record_many(
            s,
            [
                service.received_entry(r["id"], t.caller, r["kind"], r["n_records"], r["due_at"])
                for t, r in new
            ],
        )
        webhooks.requests_received(s, [r for _, r in new])
        if new:
            enqueue(s, PLAN_TASK, [r["id"] for _, r in new])
    for t, r in new:
        accepted = RequestAccepted(
            id=r["id"], status=r["status"], received_at=r["received_at"], due_at=r["due_at"]
        )
        out[id(t)] = (accepted, True)
    return out


def write_tickets(group: Sequence[Ticket]) -> list[Ticket]:
    """Write a group and answer each ticket; returns the tickets left for the next
    group (a key repeated in this one)."""
    seen: set[tuple[str, str]] = set()
    leaders: list[Ticket] = []
    again: list[Ticket] = []
    for t in group:
        if t.future.cancelled():
            continue
        k = t.key
        if k is not None and k in seen:
            again.append(t)
            continue
        if k is not None:
            seen.add(k)
        leaders.append(t)
    if not leaders:
        return again
    tasks: list[PendingTask] = []
    try:
        try:
            answers = write_group(leaders, tasks)
        except Exception as exc:
            if not _transient(exc):
                raise
            # A deadlock's loser, or a connection the server dropped, runs again, once.
            answers = write_group(leaders, tasks)
    except Exception as exc:
        if _busy(exc):
            for t in leaders:
                _settle(t.future, exc)
        else:
            log.warning("intake group of %d failed (%s); one by one", len(leaders), exc)
            for t in leaders:
                _alone(t)
        return again
    for t in leaders:
        _settle(t.future, answers[id(t)])
    # Planning and the webhooks' fan-out, sent once the callers have their answers
    # (what cannot be sent is re-sent by the resume sweep).
    outbox.send_all(tasks)
    return again


def _alone(t: Ticket) -> None:
    try:
        outcome: Accepted | BaseException = create_alone(
            t.body, t.caller, t.settings, t.idempotency_key
        )
    except Exception as exc:
        outcome = exc
    _settle(t.future, outcome)


def write_all(group: Sequence[Ticket]) -> None:
    """Write tickets in as many groups as their repeated keys need (tests, tools)."""
    held = list(group)
    while held:
        held = write_tickets(held)


class Writer:
    """One process's intake threads for one database: each takes what is waiting,
    writes it as a group, answers each, and goes on. Groups written at once by two
    threads are two transactions like any two processes' (each with its own chain)."""

    def __init__(self, threads: int = WRITER_THREADS) -> None:
        self._queue: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self._last_end = float("-inf")
        self._last_size = 1
        for i in range(threads):
            name = f"palimpsest-intake-{i}"
            threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, ticket: Ticket) -> None:
        self._queue.put(ticket)

    def _gather(self, group: list[Ticket]) -> None:
        """Add what is waiting to `group`. When busy (the previous group ended moments
        ago) wait up to LINGER_SECONDS for more, until the group is as large as the one
        before (the callers it answered are the ones coming back): a group's statements
        and commit cost about as much for one request as for fifty, so small groups
        would spend the CPU that a busy moment needs, and a request just missing a group
        waits for a whole write. A request that arrives in a quiet moment is written at
        once."""
        busy = time.monotonic() - self._last_end < BUSY_SECONDS
        deadline = time.monotonic() + LINGER_SECONDS if busy else None
        expected = self._last_size if busy else 0
        while len(group) < MAX_GROUP:
            try:
                if deadline is None or len(group) >= expected:
                    group.append(self._queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                group.append(self._queue.get(timeout=left))
            except queue.Empty:
                return

    def _run(self) -> None:
        held: list[Ticket] = []
        while True:
            group = held or [self._queue.get()]
            self._gather(group)
            try:
                held = write_tickets(group)
            except BaseException as exc:  # never lose the thread, nor leave a caller waiting
                log.exception("intake group failed")
                for t in group:
                    _settle(t.future, exc)
                held = []
            self._last_size = len(group)
            self._last_end = time.monotonic()


_writers: dict[str, Writer] = {}
_writers_lock = threading.Lock()


def writer(settings: Settings) -> Writer:
    url = settings.database_url
    w = _writers.get(url)
    if w is None:
        with _writers_lock:
            w = _writers.get(url)
            if w is None:
                w = _writers[url] = Writer()
    return w


async def accept(
    body: DeletionRequestIn,
    caller: Caller,
    settings: Settings,
    idempotency_key: str | None,
    reply_to: str | None,
    reply_to_token: str | None,
) -> Accepted:
    """Accept one request: in this process's next group, or alone."""
    service.check_idempotency_key(idempotency_key)
    if not groupable(body, reply_to, reply_to_token):
        return await run_in_threadpool(
            create_alone, body, caller, settings, idempotency_key, reply_to, reply_to_token
        )
    ticket = Ticket(body, caller, settings, idempotency_key)
    writer(settings).submit(ticket)
    return await asyncio.wrap_future(ticket.future)
