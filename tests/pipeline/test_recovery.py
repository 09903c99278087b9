"""The resume sweep and job leases, against a real database (no worker): stale running
jobs are taken over (pending again, attempts kept, lock released, audited, re-sent),
live ones are left alone, and an execution that lost its job can change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.core.db import PendingTask, session_scope
from app.jobs import lease, recovery
from app.jobs import service as jobs
from app.models import AuditEvent, Dataset, Job, MLModel
from app.models.base import new_id, utcnow
from app.pipeline import start
from app.pipeline.conclude import fail_job
from app.requests.lifecycle import EVENTS
from tests.support.app_env import AppEnv


@pytest.fixture(autouse=True)
def leases(env: AppEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Known lease lengths, whatever the environment says."""
    monkeypatch.setenv("PALIMPSEST_JOB_LEASE_SECONDS", "60")
    monkeypatch.setenv("PALIMPSEST_JOB_SHARD_LEASE_SECONDS", "600")
    from app.core.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _model() -> str:
    with session_scope() as s:
        ds = Dataset(
            name=f"ds-{new_id()[:8]}", spec={}, schema={}, n_partitions=1, artifact_prefix="x"
        )
        s.add(ds)
        s.flush()
        model = MLModel(name=f"m-{new_id()[:8]}", dataset_id=ds.id, config={}, status="ready")
        s.add(model)
        s.flush()
        return model.id


def _job(model_id: str, *, status: str, age: float | None, **fields: Any) -> str:
    """A job of `model_id` whose heartbeat is `age` seconds old; a running one holds the
    model's lock."""
    now = utcnow()
    with session_scope() as s:
        job = Job(kind="unlearn", model_id=model_id, status=status, **fields)
        if status == "running":
            job.started_at = now - timedelta(seconds=(age or 0) + 5)
            job.heartbeat_at = None if age is None else now - timedelta(seconds=age)
            job.worker = "gone-host:4242"
            job.attempts = fields.get("attempts", 1)
        s.add(job)
        s.flush()
        if status == "running":
            model = s.get(MLModel, model_id)
            assert model is not None
            model.locked_by_job = job.id
        return job.id


def _sweep(**kwargs: Any) -> tuple[dict[str, int], list[PendingTask]]:
    with session_scope() as s:
        counts = recovery.resume(s, **kwargs)
        sent = list(s.info.get("outbox", []))  # sent once this transaction commits
    return counts, sent


def _audit(action: str, entity_id: str) -> int:
    with session_scope() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action == action, AuditEvent.entity_id == entity_id)
            )
            or 0
        )


def test_stale_running_job_is_taken_over_and_resent(env: AppEnv) -> None:
    m_stale, m_live, m_shards = _model(), _model(), _model()
    stale = _job(m_stale, status="running", age=300, attempts=2)
    live = _job(m_live, status="running", age=5)
    # Waiting for its fanned-out shards: the longer shard lease applies.
    shards = _job(
        m_shards, status="running", age=300, attempts=1, result={"fanout": {"attempt": 1}}
    )
    counts, sent = _sweep(older_than_seconds=3600)
    assert counts["taken_over"] == 1
    assert [(t.name, t.args, t.queue) for t in sent] == [
        ("palimpsest.run_unlearning", (stale,), "gpu")
    ]
    with session_scope() as s:
        job = s.get(Job, stale)
        assert job is not None
        assert (job.status, job.attempts, job.worker, job.heartbeat_at) == (
            "pending",
            2,
            None,
            None,
        )
        (takeover,) = job.result["takeovers"]
        assert takeover["worker"] == "gone-host:4242" and takeover["attempt"] == 2
        assert takeover["by"] == "beat" and "no heartbeat" in takeover["reason"]
        locks = {m: s.get(MLModel, m).locked_by_job for m in (m_stale, m_live, m_shards)}  # type: ignore[union-attr]
        assert locks == {m_stale: None, m_live: live, m_shards: shards}
        assert s.get(Job, live).status == "running"  # type: ignore[union-attr]
        assert s.get(Job, shards).status == "running"  # type: ignore[union-attr]
    assert _audit("job.taken_over", stale) == 1
    assert _audit("job.taken_over", live) == 0
    # A second sweep finds nothing running to take over (the job waits for its task).
    counts, _ = _sweep(older_than_seconds=3600)
    assert counts["taken_over"] == 0


def test_running_job_without_any_heartbeat_is_judged_by_its_start(env: AppEnv) -> None:
    job_id = _job(_model(), status="running", age=None)  # started 5 s ago, never beat
    assert _sweep()[0]["taken_over"] == 0
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.started_at = utcnow() - timedelta(seconds=120)
    assert _sweep()[0]["taken_over"] == 1


def test_pending_jobs_held_by_batching_are_not_handed_out(env: AppEnv) -> None:
    model_id = _model()
    old = utcnow() - timedelta(hours=1)
    held = _job(model_id, status="pending", age=None, created_at=old)
    due = _job(model_id, status="pending", age=None, created_at=old)
    fresh = _job(model_id, status="pending", age=None)
    with session_scope() as s:
        s.get(Job, held).not_before = utcnow() + timedelta(minutes=5)  # type: ignore[union-attr]
        s.get(Job, due).not_before = utcnow() - timedelta(minutes=5)  # type: ignore[union-attr]
    counts, sent = _sweep(older_than_seconds=60)
    # Held jobs, even past their time, belong to the batching release (which clears the
    # hold as it sends them; a worker leaves a held job alone): the sweep sends neither.
    assert counts["jobs"] == 0 and sent == []
    assert fresh not in {t.args[0] for t in sent}  # its own message is still on the way
    with session_scope() as s:
        s.get(Job, due).not_before = None  # type: ignore[union-attr]
    counts, sent = _sweep(older_than_seconds=60)
    assert counts["jobs"] == 1 and [t.args for t in sent] == [(due,)]


def test_an_execution_that_was_taken_over_changes_nothing(env: AppEnv) -> None:
    job_id = _job(_model(), status="running", age=300, attempts=1)
    old = lease.Lease(job_id, token=1, exclusive=True)
    _sweep()
    # Its heartbeat finds the job gone and marks the lease lost ...
    assert old.beat() is False and old.lost.is_set()
    with pytest.raises(lease.LeaseLost):
        old.check()
    # ... and the transaction that would conclude the job refuses it.
    with pytest.raises(lease.LeaseLost), session_scope() as s:
        jobs.claim(s, job_id, 1)
    # The new execution (attempt 2) owns it; the old one can neither fail nor release it.
    with lease.held(job_id) as new, session_scope() as s:
        job = start.begin(s, job_id, "unlearn")
        assert job is not None and job.attempts == 2 and new.token == 2
    fail_job(job_id, "late failure of attempt 1", EVENTS, token=1)
    jobs.release(job_id, 1, "late retry of attempt 1")
    with session_scope() as s:
        job = jobs.claim(s, job_id, 2)
        assert (job.status, job.error, job.worker) == ("running", None, lease.worker_id())


def test_a_duplicate_delivery_leaves_a_live_job_alone(env: AppEnv) -> None:
    job_id = _job(_model(), status="running", age=2, attempts=1)
    with session_scope() as s:
        assert start.begin(s, job_id, "unlearn") is None
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.attempts) == ("running", 1)
    # Once its lease has expired, the next delivery takes it over at once.
    with session_scope() as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)  # type: ignore[union-attr]
    with lease.held(job_id), session_scope() as s:
        job = start.begin(s, job_id, "unlearn")
        assert job is not None and job.attempts == 2 and job.status == "running"
        assert job.result["takeovers"][0]["by"] == "worker"
    assert _audit("job.taken_over", job_id) == 1


def test_a_finished_job_is_never_started_again(env: AppEnv) -> None:
    model_id = _model()
    job_id = _job(model_id, status="succeeded", age=None, attempts=1)
    with lease.held(job_id), session_scope() as s:
        assert start.begin(s, job_id, "unlearn") is None
    assert _sweep(older_than_seconds=0)[0] == {
        "taken_over": 0,
        "jobs": 0,
        "requests": 0,
        "deferred": 0,
    }


def test_a_process_holds_a_job_once(env: AppEnv) -> None:
    job_id = _job(_model(), status="pending", age=None)
    with lease.held(job_id), pytest.raises(lease.LeaseLost), lease.held(job_id):
        pass
    # Shards of a fanned-out job share it.
    with lease.held(job_id, exclusive=False), lease.held(job_id, exclusive=False):
        pass


def test_pending_work_waits_for_its_queued_message_while_there_is_a_backlog(
    env: AppEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With messages waiting in the (real, SQLite) broker's GPU queue, a pending job is
    assumed to have its message among them: not re-sent. Once the queue is empty, a
    pending job has lost its message and is re-sent."""
    from kombu import Connection

    from app.core.settings import get_settings

    broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    monkeypatch.setenv("PALIMPSEST_BROKER_URL", broker)
    get_settings.cache_clear()
    job_id = _job(_model(), status="pending", age=None)
    with Connection(broker) as conn:
        queue = conn.SimpleQueue("gpu")
        queue.put({"backlog": 1})
        counts, sent = _sweep(older_than_seconds=0)
        assert counts["jobs"] == 0 and counts["deferred"] == 1 and sent == []
        queue.get(timeout=5).ack()
        queue.close()
    counts, sent = _sweep(older_than_seconds=0)
    assert counts["jobs"] == 1 and counts["deferred"] == 0
    assert [(t.name, t.args) for t in sent] == [("palimpsest.run_unlearning", (job_id,))]


def test_one_job_per_model_while_other_models_proceed(env: AppEnv) -> None:
    """The per-model lock serialises jobs on one model only: a second job on a locked
    model is refused (the task retries later), a job on another model starts at once."""
    busy, free = _model(), _model()
    running = _job(busy, status="running", age=1)
    waiting = _job(busy, status="pending", age=None)
    other = _job(free, status="pending", age=None)
    with lease.held(waiting), session_scope() as s, pytest.raises(start.ModelBusy):
        start.begin(s, waiting, "unlearn")
    with lease.held(other), session_scope() as s:
        job = start.begin(s, other, "unlearn")
        assert job is not None and job.status == "running"
    with session_scope() as s:
        locks = {m: s.get(MLModel, m).locked_by_job for m in (busy, free)}  # type: ignore[union-attr]
    assert locks == {busy: running, free: other}
