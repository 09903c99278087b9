"""A running job's lease: which worker runs it, and a heartbeat that proves it is alive.

A job that starts records its worker (`host:pid`), bumps `attempts` and stamps
`heartbeat_at`. While it runs, a daemon thread of this process refreshes the heartbeat
in short transactions of its own. The attempt number is the fencing token: every write
a job makes on its way to a result (heartbeat, progress, the concluding transaction)
requires `status = 'running' AND attempts = token`, so once the resume sweep has handed
a stale job to another worker (which bumps `attempts`), the old execution can change
nothing: its heartbeat notices, marks the lease lost, and the job's next progress report
stops it (`LeaseLost`). A worker that cannot reach the database for a whole lease stops
by itself too, since by then another worker may have been given the job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.settings import get_settings
from app.models import Job
from app.models.base import utcnow

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This execution no longer owns its job: another worker took it over."""


def worker_id() -> str:
    """This process, as recorded on the jobs it runs (the pid after any fork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_stale(job: Job, now: datetime | None = None) -> bool:
    """A running job whose lease has expired (its worker is gone, or cut off)."""
    settings = get_settings()
    now = now or utcnow()
    last = job.heartbeat_at or job.started_at or job.created_at
    shards = waiting_for_shards(job)
    lease = settings.job_shard_lease_seconds if shards else settings.job_lease_seconds
    return last < now - timedelta(seconds=lease)


def waiting_for_shards(job: Job) -> bool:
    """The job's current attempt has fanned out its shards (a Celery chord)."""
    fanout = (job.result or {}).get("fanout") or {}
    return job.status == "running" and fanout.get("attempt") == job.attempts


def ended_here(job: Job) -> bool:
    """A running job whose last execution was this process's and is over: a process
    holds a job once at a time, so a new task for it here means the old one ended (a
    retry after an error whose release could not be written)."""
    with _mutex:
        running = any(x.token is not None for x in _active.get(job.id, []))
    return job.worker == worker_id() and not waiting_for_shards(job) and not running


def owned(job: Job | None, token: int) -> bool:
    return job is not None and job.status == "running" and job.attempts == token


class Lease:
    """One execution's hold on a job (a whole job, or one shard of a fanned-out job)."""

    def __init__(self, job_id: str, token: int | None, exclusive: bool) -> None:
        self.job_id = job_id
        self.token = token
        self.exclusive = exclusive
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.monotonic()

    def bind(self, token: int) -> None:
        """The job has started under attempt `token` (committed or about to be)."""
        self.token = token
        self._last_ok = time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"heartbeat-{self.job_id}", daemon=True
            )
            self._thread.start()

    def beat(self) -> bool:
        """Refresh the heartbeat; False (and the lease marked lost) when the job is no
        longer this execution's."""
        if self.token is None:
            return True
        with session_scope() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == "running", Job.attempts == self.token)
                .values(heartbeat_at=utcnow())
            )
            if not res.rowcount:  # type: ignore[attr-defined]
                row = s.execute(
                    select(Job.status, Job.attempts).where(Job.id == self.job_id)
                ).first()
                # attempts < token: our own start is not committed yet.
                if row is None or row.attempts > self.token or row.attempts == self.token:
                    self.lost.set()
                    return False
        self._last_ok = time.monotonic()
        return True

    def check(self) -> None:
        """Raise LeaseLost if another worker may have been given the job."""
        if self.lost.is_set():
            raise LeaseLost(self.job_id)
        if self.token is not None:
            silent = time.monotonic() - self._last_ok
            if silent > get_settings().job_lease_seconds:
                self.lost.set()
                raise LeaseLost(f"{self.job_id}: no heartbeat for {silent:.0f} s")

    def _loop(self) -> None:
        interval = get_settings().job_heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                if not self.beat():
                    log.warning("job %s was taken over by another worker", self.job_id)
                    return
            except Exception:
                # A dropped connection: the pool reconnects on the next beat.
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_active: dict[str, list[Lease]] = {}
_mutex = threading.Lock()


@contextmanager
def held(job_id: str, token: int | None = None, *, exclusive: bool = True) -> Iterator[Lease]:
    """Hold `job_id` for the duration of a task. `token` is known for shards of a
    fanned-out job (the parent's attempt); a whole job learns it when it starts (`bind`).
    An exclusive hold is refused (`LeaseLost`) while this process already runs the job."""
    lease = Lease(job_id, token, exclusive)
    with _mutex:
        others = _active.setdefault(job_id, [])
        if exclusive and any(o.exclusive for o in others):
            raise LeaseLost(f"{job_id} is already running in this process")
        others.append(lease)
    try:
        if token is not None:
            lease.bind(token)
            lease.beat()
        yield lease
    finally:
        lease.close()
        with _mutex:
            leases = _active.get(job_id, [])
            if lease in leases:
                leases.remove(lease)
            if not leases:
                _active.pop(job_id, None)


def bind(job_id: str, token: int) -> None:
    """Called when the job starts: this process's exclusive hold learns its token."""
    with _mutex:
        leases = [x for x in _active.get(job_id, []) if x.exclusive and x.token is None]
    for lease in leases:
        lease.bind(token)


def token(job_id: str) -> int | None:
    with _mutex:
        tokens = [x.token for x in _active.get(job_id, []) if x.token is not None]
    return tokens[0] if tokens else None


def check(job_id: str) -> None:
    """Stop this execution (LeaseLost) if its job was taken over."""
    with _mutex:
        leases = list(_active.get(job_id, []))
    for lease in leases:
        lease.check()


def describe(job: Job) -> dict[str, Any]:
    return {
        "worker": job.worker,
        "attempt": job.attempts,
        "heartbeat_at": job.heartbeat_at.isoformat() if job.heartbeat_at else None,
    }
