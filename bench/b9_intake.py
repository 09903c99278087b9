"""Benchmark B9: intake of deletion requests on the production shape.

Run with `python -m bench.b9_intake` (`--quick` for a short smoke run; `--seconds`,
`--clients`, `--api-workers`). It needs PostgreSQL and Redis (PALIMPSEST_TEST_POSTGRES_URL,
PALIMPSEST_TEST_REDIS_URL; the Makefile's defaults otherwise) and runs the service as it is
deployed:

* a private PostgreSQL database and Redis database number; `palimpsest api` with its
  default process count (PALIMPSEST_API_WORKERS, the core count) unless told otherwise;
* a dataset of N subjects uploaded over HTTP; one portal key;
* **load**: C keep-alive clients on 127.0.0.1 (bench/loadgen.py, in this process) send
  `POST /v1/deletion-requests` back to back for a bounded time, each a subject request for
  a subject the dataset holds, each with a unique `Idempotency-Key`. Measured:
  requests/s, p50/p99 latency, errors (anything but 202, and transport errors), and the
  generator's own CPU (its CPU seconds over the wall time, and its share of all CPU
  the machine spent meanwhile);
* **retries**: 1,000 fresh keys, each sent 10 times (10,000 requests shuffled, over the
  same clients). Intake in groups makes a concurrent twin wait for the first and answers
  it as a replay; a `409 idempotency_conflict` (possible on the one-request path) would
  be retried by the client as the API documents. Every key must end with one request id
  and the database must hold exactly 1,000 requests for them;
* **planning**: only then a `palimpsest worker` starts (so it does not share the CPU with
  the load) and the run waits until every request has left `received`. Checked: every
  202 reply's id exists exactly once, every key is used once, and all are planned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psycopg

from app.stack import LocalStack
from bench import loadgen, production_secrets

RESULTS = Path(__file__).resolve().parent / "results" / "b9.json"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379"
PATH = "/v1/deletion-requests"


@dataclass
class Result:
    api_workers: int
    clients: int
    seconds: float
    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    statuses: dict[str, int]
    api_cpu_ms_per_request: float
    generator_cpu_cores: float
    generator_cpu_share: float
    retry_keys: int
    retry_sends: int
    retry_conflicts_retried: int
    retry_errors: int
    retry_requests_created: int
    stored_once: bool
    planned: int
    planning_seconds: float
    planned_per_second: float
    audit_appends_per_s_1_chain: float
    audit_appends_per_s_16_chains: float
    audit_chain_intact: bool


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _cpu_ticks() -> int:
    """All CPU time the machine spent (user+nice+system+irq+softirq), in clock ticks."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return user + nice + system + irq + softirq


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        stats[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def _dataset(n_subjects: int) -> bytes:
    rng = random.Random(9)
    lines = ["person,district,age,score,passed"]
    for s in range(n_subjects):
        for _ in range(1 + s % 2):
            score = rng.gauss(0, 1)
            lines.append(f"p{s:05d},d{s % 20},{rng.randint(15, 19)},{score:.3f},{int(score > 0)}")
    return ("\n".join(lines) + "\n").encode()


def _ingest(admin: httpx.Client, n_subjects: int) -> None:
    spec = {
        "name": "b9",
        "subject_column": "person",
        "label_column": "passed",
        "source_column": "district",
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("b9.csv", _dataset(n_subjects), "text/csv")},
        data={"spec": json.dumps(spec)},
        timeout=300,
    )
    assert r.status_code == 201, r.text


def _load(
    port: int, portal_key: str, clients: int, seconds: float, n_subjects: int, run: str
) -> tuple[loadgen.Tally, float, dict[str, str], float, float]:
    """The sustained load: the tally, wall time, {key: id} of the 202s, generator CPU."""
    counter = iter(range(10**9))
    created: dict[str, str] = {}
    auth = f"Bearer {portal_key}"

    def make() -> bytes:
        i = next(counter)
        headers = {"Authorization": auth, "Idempotency-Key": f"{run}-load-{i}"}
        body = {"kind": "subject", "subject_id": f"p{i % n_subjects:05d}"}
        return loadgen.post_json(PATH, headers, body, f"127.0.0.1:{port}")

    def on_reply(raw: bytes, reply: loadgen.Reply) -> None:
        if reply.status == 202:
            key = raw.split(b"Idempotency-Key: ", 1)[1].split(b"\r\n", 1)[0].decode()
            created[key] = json.loads(reply.body)["id"]

    cpu0, ticks0 = time.process_time(), _cpu_ticks()
    tally, wall = asyncio.run(loadgen.run_for("127.0.0.1", port, clients, seconds, make, on_reply))
    cpu = time.process_time() - cpu0
    machine = (_cpu_ticks() - ticks0) / os.sysconf("SC_CLK_TCK")
    return tally, wall, created, cpu / wall, cpu / machine if machine else float("nan")


def _retries(
    port: int, portal_key: str, clients: int, keys: int, copies: int, n_subjects: int, run: str
) -> tuple[loadgen.Tally, dict[str, set[str]]]:
    auth = f"Bearer {portal_key}"
    order = [k for k in range(keys) for _ in range(copies)]
    random.Random(1).shuffle(order)
    raws = [
        loadgen.post_json(
            PATH,
            {"Authorization": auth, "Idempotency-Key": f"{run}-retry-{k}"},
            {"kind": "subject", "subject_id": f"p{k % n_subjects:05d}"},
            f"127.0.0.1:{port}",
        )
        for k in order
    ]
    ids: dict[str, set[str]] = {}

    def conflict(reply: loadgen.Reply) -> bool:
        return reply.status == 409 and b"idempotency_conflict" in reply.body

    def on_reply(i: int, reply: loadgen.Reply) -> None:
        if reply.status in (200, 202):
            ids.setdefault(f"{run}-retry-{order[i]}", set()).add(json.loads(reply.body)["id"])

    tally = asyncio.run(loadgen.run_all("127.0.0.1", port, clients, raws, conflict, on_reply))
    return tally, ids


def chain_appends(db_url: str, chains: int, seconds: float = 4.0, threads: int = 12) -> float:
    """Audit events appended per second by `threads` concurrent one-event transactions
    with the log split into `chains` chains (1 is the old single chain): what the chain
    locks alone allow, in one process, apart from the rest of the request."""
    from sqlalchemy.orm import sessionmaker

    from app.audit import service as audit
    from app.core.db import make_engine

    engine = make_engine(db_url)
    factory = sessionmaker(engine, expire_on_commit=False)
    saved, audit.CHAINS = audit.CHAINS, chains
    done = [0]
    stop = time.perf_counter() + seconds

    def writer() -> None:
        while time.perf_counter() < stop:
            with factory() as s, s.begin():
                audit.record(
                    s,
                    actor="bench:b9",
                    action="bench.append",
                    entity_type="bench",
                    entity_id=uuid.uuid4().hex,
                )
            done[0] += 1

    try:
        pool = [threading.Thread(target=writer) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        audit.CHAINS = saved
        engine.dispose()
    return done[0] / seconds


def _count(db_url: str, sql: str, *params: Any) -> int:
    with psycopg.connect(_plain(db_url)) as conn:
        row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def run(
    *, seconds: float, clients: int, api_workers: int | None, n_subjects: int, retry_keys: int
) -> Result:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", PG_DEFAULT)
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", REDIS_DEFAULT).rstrip("/")
    name = f"palimpsest_b9_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_plain(pg), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = f"{pg.rsplit('/', 1)[0]}/{name}"
    broker = f"{redis_url}/{1 + uuid.uuid4().int % 15}"
    env = {
        "PALIMPSEST_DATABASE_URL": db_url,
        "PALIMPSEST_BROKER_URL": broker,
        "PALIMPSEST_RESULT_BACKEND": broker,
        "PALIMPSEST_DEVICE": "cpu",
        "PALIMPSEST_TORCH_THREADS": "1",
        "PALIMPSEST_LOG_LEVEL": "WARNING",  # a log line per request is not intake's cost
    } | production_secrets()
    workers = api_workers or len(os.sched_getaffinity(0))
    # As deployed: one process per core unless told (LocalStack's own default is one).
    env["PALIMPSEST_API_WORKERS"] = str(workers)
    run_id = uuid.uuid4().hex[:6]
    try:
        with tempfile.TemporaryDirectory(prefix="b9-") as tmp:
            stack = LocalStack(Path(tmp) / "stack", env=env)
            stack.start(worker=False)
            try:
                admin_key = stack.create_key("admin", "b9-admin")
                portal_key = stack.create_key("portal", "b9-portal")
                with httpx.Client(
                    base_url=stack.base_url, headers={"Authorization": f"Bearer {admin_key}"}
                ) as admin:
                    _ingest(admin, n_subjects)
                # Warm every process's connection pools before measuring.
                loadgen_warm = _load(stack.port, portal_key, clients, 2.0, n_subjects, "warm")
                api_cpu0 = _tree_cpu(stack.procs[0].pid)
                tally, wall, created, cores, share = _load(
                    stack.port, portal_key, clients, seconds, n_subjects, run_id
                )
                api_cpu = _tree_cpu(stack.procs[0].pid) - api_cpu0
                rtally, ids = _retries(
                    stack.port, portal_key, clients, retry_keys, 10, n_subjects, run_id
                )
                retry_created = _count(
                    db_url,
                    "SELECT count(*) FROM deletion_requests WHERE idempotency_key LIKE %s",
                    f"{run_id}-retry-%",
                )
                one_id_per_key = len(ids) == retry_keys and all(len(v) == 1 for v in ids.values())
                expected = len(created) + len(loadgen_warm[2]) + retry_keys
                stored = _count(db_url, "SELECT count(*) FROM deletion_requests")
                dupes = _count(
                    db_url,
                    "SELECT count(*) FROM (SELECT idempotency_key FROM deletion_requests"
                    " GROUP BY api_key_id, idempotency_key HAVING count(*) > 1) d",
                )
                found = _count(
                    db_url,
                    "SELECT count(*) FROM deletion_requests WHERE id = ANY(%s)",
                    list(created.values()),
                )
                stored_once = (
                    stored == expected and dupes == 0 and found == len(created) and one_id_per_key
                )
                # Planning, by a worker started now.
                t0 = time.perf_counter()
                stack.start_worker("--queues", "default")
                # Bounded (what is left is reported), by the work: 100 planned/s at least.
                deadline = t0 + max(180.0, stored / 100.0)
                left = stored
                while time.perf_counter() < deadline:
                    left = _count(
                        db_url, "SELECT count(*) FROM deletion_requests WHERE status = 'received'"
                    )
                    if left == 0:
                        break
                    time.sleep(0.5)
                plan_s = time.perf_counter() - t0
            finally:
                stack.stop()
            one_chain = chain_appends(db_url, 1)
            many_chains = chain_appends(db_url, 16)
            try:  # the whole log: intake, planning, and the appends just made
                intact = "intact" in stack.cli("audit", "verify")
            except RuntimeError:
                intact = False
    finally:
        with psycopg.connect(_plain(pg), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    n = len(tally.latencies)
    errors = n - tally.statuses.get(202, 0) + tally.transport_errors
    retry_errors = sum(v for k, v in rtally.statuses.items() if k not in (200, 202, 409))
    return Result(
        api_workers=workers,
        clients=clients,
        seconds=round(wall, 2),
        requests=n,
        requests_per_second=round(n / wall, 1),
        p50_ms=round(tally.percentile(0.50) * 1000, 1),
        p99_ms=round(tally.percentile(0.99) * 1000, 1),
        errors=errors,
        statuses={str(k): v for k, v in sorted(tally.statuses.items())},
        api_cpu_ms_per_request=round(1000 * api_cpu / max(1, n), 2),
        generator_cpu_cores=round(cores, 2),
        generator_cpu_share=round(share, 3),
        retry_keys=retry_keys,
        retry_sends=retry_keys * 10,
        retry_conflicts_retried=rtally.statuses.get(409, 0),
        retry_errors=retry_errors + rtally.transport_errors,
        retry_requests_created=retry_created,
        stored_once=stored_once,
        planned=stored - left,
        planning_seconds=round(plan_s, 1),
        planned_per_second=round((stored - left) / plan_s, 1),
        audit_appends_per_s_1_chain=round(one_chain, 1),
        audit_appends_per_s_16_chains=round(many_chains, 1),
        audit_chain_intact=intact,
    )


def print_table(r: Result) -> None:
    rows = [
        ("API processes / clients", f"{r.api_workers} / {r.clients}"),
        ("requests in the load", f"{r.requests} in {r.seconds} s"),
        ("requests/s", f"{r.requests_per_second}"),
        ("latency p50 / p99", f"{r.p50_ms} ms / {r.p99_ms} ms"),
        ("API CPU per request", f"{r.api_cpu_ms_per_request} ms"),
        ("errors (non-202 + transport)", f"{r.errors} {r.statuses}"),
        (
            "load generator CPU",
            f"{r.generator_cpu_cores} cores, {r.generator_cpu_share:.0%} of all CPU used",
        ),
        (
            "retries: keys x sends -> requests",
            f"{r.retry_keys} x 10 -> {r.retry_requests_created}"
            f" (409 conflicts retried {r.retry_conflicts_retried}, errors {r.retry_errors})",
        ),
        ("every request stored exactly once", "yes" if r.stored_once else "NO"),
        ("planned afterwards", f"{r.planned} in {r.planning_seconds} s"),
        (
            "audit appends/s, 12 writers: 1 chain / 16",
            f"{r.audit_appends_per_s_1_chain} / {r.audit_appends_per_s_16_chains}"
            f" (log intact: {'yes' if r.audit_chain_intact else 'NO'})",
        ),
    ]
    width = max(len(a) for a, _ in rows)
    print("B9 intake: POST /v1/deletion-requests on PostgreSQL + Redis")
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")
    goal = r.requests_per_second >= 1000 and r.p99_ms <= 50 and r.errors == 0
    print(f"  goal (>= 1,000 req/s, p99 <= 50 ms, 0 errors): {'met' if goal else 'not met'}")


def _reachable(url: str, port: int) -> bool:
    u = urlparse(_plain(url))
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or port), timeout=2):
            return True
    except OSError:
        return False


def main(
    quick: bool = False,
    seconds: float | None = None,
    clients: int = 32,
    api_workers: int | None = None,
) -> Result | None:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", PG_DEFAULT)
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", REDIS_DEFAULT)
    if not (_reachable(pg, 5432) and _reachable(redis_url, 6379)):
        print(f"B9 skipped: PostgreSQL ({pg}) and Redis ({redis_url}) must both answer")
        return None
    r = run(
        seconds=seconds or (5.0 if quick else 20.0),
        clients=clients,
        api_workers=api_workers,
        n_subjects=2000 if quick else 10000,
        retry_keys=200 if quick else 1000,
    )
    print_table(r)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"measured_at": datetime.now().isoformat(timespec="seconds"), **asdict(r)}, indent=2
        )
    )
    return r


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--api-workers", type=int)
    a = parser.parse_args()
    main(quick=a.quick, seconds=a.seconds, clients=a.clients, api_workers=a.api_workers)
