"""Crash safety with real processes: a worker killed with SIGKILL in the middle of a job,
a Redis restart during a job, and the worker's database connections dropped during a
job. Each time the job is picked up again (or carries on), completes once, promotes one
version once, and every request completes with its certificate.

The job is slowed down by the test hook PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS (a
sleep after each progress write of an unlearning job) so that the crash lands in its
middle; everything else is the product as it runs: `palimpsest api`, `palimpsest worker
--beat` (whose resume sweep does the recovery), the broker and the database. Leases and
the sweep run on short settings here (seconds instead of a minute).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.stack import LocalStack, free_port
from tests.integration.conftest import (
    _drop_postgres_database,
    _postgres_database,
    _reachable,
    _unavailable,
)
from tests.integration.flows import TERMINAL, ingest, make_csv, train, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAST_RECOVERY = {
    "PALIMPSEST_DEVICE": "cpu",
    "PALIMPSEST_TORCH_THREADS": "1",
    "PALIMPSEST_JOB_HEARTBEAT_SECONDS": "1",
    "PALIMPSEST_JOB_LEASE_SECONDS": "6",
    "PALIMPSEST_JOB_SHARD_LEASE_SECONDS": "8",
    "PALIMPSEST_RESUME_INTERVAL_SECONDS": "2",
    "PALIMPSEST_RESUME_AFTER_SECONDS": "5",
}
MODEL = {
    "name": "pass-predictor",
    "architecture": {"kind": "mlp", "hidden": [16]},
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.01, "seed": 1},
    "unlearning": {"mode": "sisa", "shards": 4, "slices": 3, "sharding": "subject"},
    "verification": {"utility_max_drop": 0.06},
}


# -- shapes -------------------------------------------------------------------------------


def _postgres_env() -> tuple[dict[str, str], Any]:
    """A private PostgreSQL database; its URL in the env, and the cleanup."""
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", "")
    if not pg or not _reachable(pg, 5432):
        _unavailable(f"PostgreSQL not reachable at {pg or '(PALIMPSEST_TEST_POSTGRES_URL unset)'}")
    name = _postgres_database(pg)
    env = {
        "PALIMPSEST_DATABASE_URL": f"{pg.rsplit('/', 1)[0]}/{name}",
        # A server database is production: it refuses to start without secrets.
        "PALIMPSEST_SUBJECT_PEPPER": f"test-pepper-{uuid.uuid4().hex}",
        "PALIMPSEST_DASHBOARD_SESSION_SECRET": f"test-session-{uuid.uuid4().hex}",
    }
    return env, (lambda: _drop_postgres_database(pg, name))


def _shared_redis_env() -> dict[str, str]:
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", "")
    if not redis_url or not _reachable(redis_url, 6379):
        _unavailable(f"Redis not reachable at {redis_url or '(PALIMPSEST_TEST_REDIS_URL unset)'}")
    url = f"{redis_url.rstrip('/')}/{1 + uuid.uuid4().int % 15}"  # a private db number
    return {"PALIMPSEST_BROKER_URL": url, "PALIMPSEST_RESULT_BACKEND": url}


@contextlib.contextmanager
def _stack(folder: Path, env: dict[str, str], cleanup: Any = None) -> Iterator[LocalStack]:
    st = LocalStack(folder / "stack", env={**FAST_RECOVERY, **env})
    try:
        st.start()
        yield st
    finally:
        st.stop()
        if cleanup is not None:
            cleanup()


class PrivateRedis:
    """A redis-server of this test's own on a free port (never the shared one), without
    persistence: stopping it loses every queued message, as a crash would."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("ab")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(
            ["redis-server", *args, "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ping, bool, timeout=20)

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SHUTDOWN NOSAVE: everything in it is gone."""
        import redis

        if self.proc is None:
            return
        with contextlib.suppress(redis.RedisError):  # it answers by hanging up
            redis.Redis(port=self.port, socket_timeout=2).shutdown(nosave=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed")
    r = PrivateRedis(tmp_path / "redis")
    r.start()
    try:
        yield r
    finally:
        r.stop()


# -- helpers ------------------------------------------------------------------------------


def _clients(stack: LocalStack) -> tuple[httpx.Client, httpx.Client]:
    def client(role: str) -> httpx.Client:
        key = stack.create_key(role, f"{role}-crash")
        return httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    return client("admin"), client("portal")


def _model(admin: httpx.Client) -> dict[str, Any]:
    ds = ingest(admin, "districts", make_csv())
    return train(admin, {**MODEL, "dataset_id": ds["id"]})


def _request(portal: httpx.Client, subject: str) -> str:
    return _post(portal, {"kind": "subject", "subject_id": subject})


def _post(portal: httpx.Client, body: dict[str, Any]) -> str:
    r = portal.post("/v1/deletion-requests", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _running_job(
    admin: httpx.Client, portal: httpx.Client, rid: str, *, fanned_out: bool = False
) -> dict[str, Any]:
    """The request's job once it runs and has reported progress (or, `fanned_out`, once
    its shards are on their way)."""

    def job() -> dict[str, Any]:
        req = portal.get(f"/v1/deletion-requests/{rid}").json()
        job_id = next((m["job_id"] for m in req.get("models", []) if m.get("job_id")), None)
        return admin.get(f"/v1/jobs/{job_id}").json() if job_id else {"request": req}

    def running(j: dict[str, Any]) -> bool:
        if j.get("status") != "running":
            return False
        return "fanout" in j["result"] if fanned_out else j.get("progress", 0) > 0

    found: dict[str, Any] = wait_for(job, running, timeout=120)
    return found


def _finished(portal: httpx.Client, rid: str) -> dict[str, Any]:
    done: dict[str, Any] = wait_for(
        lambda: portal.get(f"/v1/deletion-requests/{rid}").json(),
        lambda d: d["status"] in TERMINAL,
        timeout=150,
    )
    return done


def _audit(stack: LocalStack) -> list[tuple[str, str, dict[str, Any]]]:
    engine = create_engine(stack.env["PALIMPSEST_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT action, entity_id, data FROM audit_events ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    return [(a, e, d if isinstance(d, dict) else json.loads(d)) for a, e, d in rows]


def _assert_converged(
    stack: LocalStack,
    admin: httpx.Client,
    portal: httpx.Client,
    rids: list[str],
    model: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every request completed with a certificate; each promoted one new version, once;
    the versions served are complete; the audit chain is intact. The requests' jobs."""
    jobs = []
    for rid in rids:
        done = _finished(portal, rid)
        assert done["status"] == "completed", (done, stack.tail())
        (m,) = done["models"]
        assert m["status"] == "promoted" and m["to_version"] == m["from_version"] + 1
        cert = portal.get(f"/v1/deletion-requests/{rid}/certificate")
        assert cert.status_code == 200, cert.text
        assert cert.json()["certificate"]["request"]["id"] == rid
        job = admin.get(f"/v1/jobs/{m['job_id']}").json()
        assert job["status"] == "succeeded" and job["progress"] == 1.0, job
        jobs.append(job)
    events = _audit(stack)
    promoted = [d["to_version"] for a, e, d in events if a == "model.promoted"]
    assert promoted == list(range(1, len(rids) + 2)), promoted  # no version twice
    after = admin.get(f"/v1/models/{model['name']}").json()
    assert after["production_version"] == len(rids) + 1
    assert [v["version"] for v in after["versions"]] == list(range(1, len(rids) + 2))
    for rid in rids:  # each request went through each status once
        to = [d["to"] for a, e, d in events if a == "request.status_changed" and e == rid]
        assert len(to) == len(set(to)) and to[-2:] == ["erasing", "completed"], to
    # The served version loads from its artifacts (a half-written one would not).
    pred = admin.post(
        f"/v1/models/{model['name']}/predict",
        json={"records": [{"age": 16, "score": 1.2, "home_language": "en", "track": "a"}]},
    )
    assert pred.status_code == 200 and pred.json()["version"] == len(rids) + 1, pred.text
    assert admin.get("/v1/audit/verify").json()["intact"] is True
    return jobs


def _spawn_worker(stack: LocalStack, name: str, **env: str) -> subprocess.Popen[bytes]:
    log = stack.folder / f"{name}.log"
    stack.logs.append(log)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--loglevel", "WARNING", "--beat"],
        env={
            **stack.env,
            "PALIMPSEST_BEAT_SCHEDULE_FILE": str(stack.folder / f"{name}-schedule"),
            **env,
        },
        cwd=stack.folder,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.procs.append(proc)
    return proc


def _worker(stack: LocalStack) -> subprocess.Popen[bytes]:
    (proc,) = [p for p in stack.procs if "worker" in p.args and p.poll() is None]  # type: ignore[operator]
    return proc


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["embedded", "postgres-redis"])
@pytest.mark.parametrize("target", ["subject", "source"])
def test_worker_killed_mid_job(shape: str, target: str, tmp_path: Path) -> None:
    """SIGKILL the worker (and its beat) while the job runs: nothing moves until a new
    worker starts; its sweep finds the heartbeat stale, takes the job over, and the job
    completes once, with attempts >= 2 and the takeover on record. A subject reaches one
    shard (the job trains it in its own task); a source reaches every shard, so the job
    fans out as a chord and the worker dies in the middle of a shard task."""
    env, cleanup = {"PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS": "1.0"}, None
    if shape == "postgres-redis":
        redis_env = _shared_redis_env()
        pg_env, cleanup = _postgres_env()
        env |= pg_env | redis_env
    with _stack(tmp_path, env, cleanup) as stack:
        admin, portal = _clients(stack)
        model = _model(admin)
        if target == "subject":
            rid = _request(portal, "p0007")
            job = _running_job(admin, portal, rid)
        else:
            rid = _post(portal, {"kind": "source", "source": "north"})
            job = _running_job(admin, portal, rid, fanned_out=True)
            time.sleep(1.5)  # into the first shard (slowed down by the hook)
        victim = _worker(stack)
        os.killpg(victim.pid, signal.SIGKILL)  # the worker and its embedded beat
        victim.wait(timeout=30)
        time.sleep(2)
        stuck = admin.get(f"/v1/jobs/{job['id']}").json()
        assert stuck["status"] == "running" and stuck["progress"] < 1.0, stuck
        assert portal.get(f"/v1/deletion-requests/{rid}").json()["status"] not in TERMINAL

        _spawn_worker(stack, "worker-2", PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS="0")
        (done,) = _assert_converged(stack, admin, portal, [rid], model)
        assert done["id"] == job["id"] and done["attempts"] >= 2, done
        takeovers = done["result"]["takeovers"]
        assert takeovers[0]["worker"].endswith(f":{victim.pid}"), takeovers
        events = _audit(stack)
        assert [e for a, e, _ in events if a == "job.taken_over"] == [job["id"]] * len(takeovers)
        if target == "source":
            un = done["result"]["unlearning"]
            assert un["parallelism"] == "celery_chord" and un["affected_shards"] == [0, 1, 2, 3]
            assert done["result"]["fanout"]["attempt"] == done["attempts"]


def test_redis_restart_mid_job(private_redis: PrivateRedis, tmp_path: Path) -> None:
    """Redis (broker and results) stops without saving while a job runs, and a request
    arrives meanwhile (its task cannot be sent); Redis comes back empty on the same port.
    The worker reconnects, the sweep re-sends what was lost, and both requests complete."""
    pg_env, cleanup = _postgres_env()
    env = pg_env | {
        "PALIMPSEST_BROKER_URL": private_redis.url,
        "PALIMPSEST_RESULT_BACKEND": private_redis.url,
        "PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS": "1.0",
    }
    with _stack(tmp_path, env, cleanup) as stack:
        admin, portal = _clients(stack)
        model = _model(admin)
        first = _request(portal, "p0007")
        _running_job(admin, portal, first)
        private_redis.stop()
        second = _request(portal, "p0011")  # committed; its planning task is lost
        time.sleep(1)
        assert portal.get(f"/v1/deletion-requests/{second}").json()["status"] == "received"
        private_redis.start()
        jobs = _assert_converged(stack, admin, portal, [first, second], model)
        assert jobs[0]["id"] != jobs[1]["id"]
        assert all(p.poll() is None for p in stack.procs), stack.tail()  # reconnected


def test_database_connections_dropped_mid_job(tmp_path: Path) -> None:
    """PostgreSQL terminates every connection of the worker (application_name
    palimpsest-worker) again and again while the job runs: the pool replaces them
    (pre-ping), a statement that was cut off fails its attempt and the task retries,
    and the job completes once."""
    redis_env = _shared_redis_env()
    pg_env, cleanup = _postgres_env()
    env = pg_env | redis_env | {"PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS": "0.5"}
    with _stack(tmp_path, env, cleanup) as stack:
        admin, portal = _clients(stack)
        model = _model(admin)
        rid = _request(portal, "p0007")
        job = _running_job(admin, portal, rid)
        killed = 0
        engine = create_engine(stack.env["PALIMPSEST_DATABASE_URL"])
        try:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    killed += len(
                        conn.execute(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database()"
                                " AND pid <> pg_backend_pid()"
                                " AND application_name = 'palimpsest-worker'"
                            )
                        ).all()
                    )
                time.sleep(0.5)
        finally:
            engine.dispose()
        assert killed > 0  # the worker's connections were there, and were cut
        (done,) = _assert_converged(stack, admin, portal, [rid], model)
        assert done["id"] == job["id"]
        assert all(p.poll() is None for p in stack.procs), stack.tail()
