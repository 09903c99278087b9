"""B9's planning half on its own: N received subject requests planned by one
`palimpsest worker --queues default`, one `palimpsest.plan_request` task per request
against `palimpsest.plan_requests` tasks of B requests each, in the same run.

Run with `python -m bench.b9_planning` (`--requests N`, default 5,000; `--batch B`,
default 50; `--quick` for 1,000). It needs PostgreSQL and Redis
(PALIMPSEST_TEST_POSTGRES_URL, PALIMPSEST_TEST_REDIS_URL; the Makefile's defaults
otherwise) and runs the service as B9 does:

* a private PostgreSQL database and Redis database number, migrated by `palimpsest db
  upgrade`; a B9-shaped dataset (subjects with one or two rows each, 20 sources) of 2N
  subjects uploaded over HTTP to `palimpsest api`, which is then stopped;
* per side, N `received` subject requests (side one takes subjects 0..N-1, side two
  N..2N-1, so neither finds the other's records quarantined or erased), written straight
  into the database (this measures planning, not intake); their tasks are published to
  the broker first, then a worker starts (solo pool, as deployed by default);
* measured from the audit log: the first and the last request leaving `received`
  (start-up is not counted), so requests/s = N / that span; also the wall time from the
  worker's start. Then the worker stops and the queues are purged (the erasures the
  plans sent are not part of this benchmark) before the other side.

`--in-process` runs the two task bodies in this process instead (no broker round trip
to fetch each task; what they send still goes to Redis), `--profile` prints where that
time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from app.stack import LocalStack
from bench import production_secrets

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379"


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _name(s: int) -> str:
    return f"p{s:06d}"


def dataset(n_subjects: int) -> bytes:
    """B9's shape (bench/b9_intake.py): one or two rows per subject, 20 districts."""
    rng = random.Random(9)
    lines = ["person,district,age,score,passed"]
    for s in range(n_subjects):
        for _ in range(1 + s % 2):
            score = rng.gauss(0, 1)
            lines.append(f"{_name(s)},d{s % 20},{rng.randint(15, 19)},{score:.3f},{int(score > 0)}")
    return ("\n".join(lines) + "\n").encode()


def _requests(subjects: range) -> list[str]:
    """Received subject requests for these subjects, as the intake leaves them."""
    from app.core.db import session_scope
    from app.core.security import subject_key
    from app.core.settings import get_settings
    from app.models import DeletionRequest
    from app.models.base import new_id, utcnow

    pepper = get_settings().pepper
    ids: list[str] = []
    now = utcnow()
    rows = list(subjects)
    for i in range(0, len(rows), 1000):
        with session_scope() as s:
            for subj in rows[i : i + 1000]:
                rid = new_id()
                s.add(
                    DeletionRequest(
                        id=rid,
                        kind="subject",
                        status="received",
                        subject_key=subject_key(_name(subj), pepper),
                        received_at=now,
                        due_at=now + timedelta(days=30),
                    )
                )
                ids.append(rid)
    return ids


def _span(db_url: str, ids: list[str]) -> tuple[int, float]:
    """How many of `ids` left `received`, and the seconds from the first to the last."""
    with psycopg.connect(_plain(db_url)) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT entity_id), extract(epoch FROM max(at) - min(at))"
            " FROM audit_events WHERE action = 'request.status_changed'"
            " AND data->>'from' = 'received' AND entity_id = ANY(%s)",
            (ids,),
        ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


def _waiting(db_url: str, ids: list[str]) -> int:
    with psycopg.connect(_plain(db_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM deletion_requests WHERE status = 'received' AND id = ANY(%s)",
            (ids,),
        ).fetchone()
    return int(row[0]) if row else 0


def _messages(ids: list[str], batch: int | None) -> list[tuple[str, list[Any]]]:
    if batch is None:
        return [("palimpsest.plan_request", [rid]) for rid in ids]
    return [("palimpsest.plan_requests", [ids[i : i + batch]]) for i in range(0, len(ids), batch)]


def _publish(messages: list[tuple[str, list[Any]]]) -> None:
    from workers.celery_app import get_celery

    app = get_celery()
    with app.connection_for_write() as conn:
        for name, args in messages:
            app.send_task(name, args=args, queue="default", connection=conn, ignore_result=True)


def _purge() -> None:
    from workers.celery_app import get_celery

    get_celery().control.purge()


def side_worker(
    stack: LocalStack, db_url: str, ids: list[str], batch: int | None, timeout: float
) -> dict[str, Any]:
    _publish(_messages(ids, batch))
    t0 = time.perf_counter()
    stack.start_worker("--queues", "default", beat=False)
    try:
        deadline = t0 + timeout
        while _waiting(db_url, ids) and time.perf_counter() < deadline:
            time.sleep(0.1)
        wall = time.perf_counter() - t0
    finally:
        stack.stop()
        _purge()
    return _summary(db_url, ids, batch, wall)


def side_in_process(
    db_url: str, ids: list[str], batch: int | None, profile: bool
) -> dict[str, Any]:
    from workers import tasks

    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _, args in _messages(ids, batch):
        if batch is None:
            tasks.plan_request.run(*args)
        else:
            tasks.plan_requests.run(*args)
    if prof:
        prof.disable()
        print(f"--- profile, batch={batch}")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    wall = time.perf_counter() - t0
    _purge()
    return _summary(db_url, ids, batch, wall)


def _summary(db_url: str, ids: list[str], batch: int | None, wall: float) -> dict[str, Any]:
    left, span = _span(db_url, ids)
    return {
        "task": "plan_request" if batch is None else f"plan_requests x{batch}",
        "requests": len(ids),
        "planned": left,
        "still_received": _waiting(db_url, ids),
        "seconds": round(span, 3),
        "requests_per_second": round(left / span, 1) if span else None,
        "wall_seconds": round(wall, 2),
    }


def run(
    n: int, batch: int, in_process: bool, profile: bool, timeout: float
) -> list[dict[str, Any]]:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", PG_DEFAULT)
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", REDIS_DEFAULT).rstrip("/")
    name = f"palimpsest_b9p_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_plain(pg), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = f"{pg.rsplit('/', 1)[0]}/{name}"
    broker = f"{redis_url}/{1 + uuid.uuid4().int % 15}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                "PALIMPSEST_DATABASE_URL": db_url,
                "PALIMPSEST_BROKER_URL": broker,
                "PALIMPSEST_RESULT_BACKEND": broker,
                "PALIMPSEST_DEVICE": "cpu",
                "PALIMPSEST_LOG_LEVEL": "WARNING",
            } | production_secrets()
            stack = LocalStack(Path(tmp) / "stack", env=env)
            stack.start(worker=False)
            try:
                admin = stack.create_key("admin", "bench")
                spec = {
                    "name": "b9",
                    "subject_column": "person",
                    "label_column": "passed",
                    "source_column": "district",
                }
                r = httpx.post(
                    f"{stack.base_url}/v1/datasets",
                    headers={"Authorization": f"Bearer {admin}"},
                    files={"file": ("b9.csv", dataset(2 * n), "text/csv")},
                    data={"spec": json.dumps(spec)},
                    timeout=600,
                )
                assert r.status_code == 201, r.text
            finally:
                stack.stop()
            os.environ.update({k: v for k, v in stack.env.items() if k.startswith("PALIMPSEST_")})
            from app.core.db import dispose_engines
            from app.core.settings import get_settings
            from workers.celery_app import get_celery, install_sender

            get_settings.cache_clear()
            get_celery.cache_clear()
            dispose_engines()
            install_sender()
            _purge()
            out = []
            for k, b in enumerate((None, batch)):
                ids = _requests(range(k * n, (k + 1) * n))
                if in_process:
                    out.append(side_in_process(db_url, ids, b, profile))
                else:
                    out.append(side_worker(stack, db_url, ids, b, timeout))
                print(json.dumps(out[-1]), flush=True)
            return out
    finally:
        from app.core.db import dispose_engines

        dispose_engines()
        with psycopg.connect(_plain(pg), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="1,000 requests")
    p.add_argument("--in-process", action="store_true", help="run the task bodies here")
    p.add_argument("--profile", action="store_true", help="with --in-process: cProfile")
    p.add_argument("--timeout", type=float, default=600.0, help="per side, seconds")
    a = p.parse_args()
    n = 1000 if a.quick else a.requests
    single, batched = run(n, a.batch, a.in_process, a.profile, a.timeout)
    s, b = single["requests_per_second"], batched["requests_per_second"]
    if s and b:
        print(f"plan_request: {s}/s, plan_requests x{a.batch}: {b}/s ({b / s:.1f}x)")


if __name__ == "__main__":
    main()
