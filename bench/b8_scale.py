"""Benchmark B8: how the service's costs grow with the records it holds.

Run with `python -m bench.b8_scale --records 100000 300000 1000000` (the issue's sizes;
each takes many minutes and needs a machine to itself) or `--quick` (10,000 records, a
smoke run). It needs PostgreSQL and Redis (PALIMPSEST_TEST_POSTGRES_URL,
PALIMPSEST_TEST_REDIS_URL) and runs the production shape: `palimpsest api` (one process
per core) and two `palimpsest worker` processes (one with the beat), on a private
database and Redis database number. Per size:

* a seeded dataset: N records, 200 sources, subjects with 1-5 records (each subject in
  one source), four numeric and two categorical columns, uploaded as Parquet;
* a SISA model (S=32, R=4; S=8 with --quick), trained;
* 100 subject requests (10 with --quick), then one source withdrawal, each run to the end;
* measured: ingest records/s, training time, per-request planning time (received to
  planned, from the audit log), lineage query p50/p99 (`GET /v1/subjects/{id}/lineage`),
  unlearning job time per shard retrained, erasure time (erasing to completed), peak
  memory (VmHWM) of the API's processes and of each worker, database size per million
  records.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from app.stack import LocalStack
from bench import production_secrets
from bench.b9_intake import PG_DEFAULT, REDIS_DEFAULT, _plain, _reachable

RESULTS = Path(__file__).resolve().parent / "results" / "b8.json"
TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}


def dataset(n_records: int, seed: int = 8) -> tuple[bytes, list[str], list[str]]:
    """Parquet bytes, the subject ids, the source names."""
    rng = random.Random(seed)
    sources = [f"src{k:03d}" for k in range(200)]
    cols: dict[str, list[Any]] = {
        k: [] for k in ("person", "source", "x0", "x1", "x2", "x3", "c0", "c1", "label")
    }
    subjects: list[str] = []
    while len(cols["person"]) < n_records:
        sid = f"s{len(subjects):07d}"
        subjects.append(sid)
        src = sources[rng.randrange(200)]
        for _ in range(min(rng.randint(1, 5), n_records - len(cols["person"]))):
            x = [rng.gauss(0, 1) for _ in range(4)]
            c0, c1 = rng.randrange(8), rng.randrange(40)
            logit = 1.2 * x[0] - x[1] + 0.5 * x[2] * x[3] + (0.7 if c0 < 3 else -0.3)
            for k, v in zip(("x0", "x1", "x2", "x3"), x, strict=True):
                cols[k].append(round(v, 4))
            cols["person"].append(sid)
            cols["source"].append(src)
            cols["c0"].append(f"a{c0}")
            cols["c1"].append(f"b{c1}")
            cols["label"].append(int(logit + rng.gauss(0, 0.5) > 0))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd")
    return buf.getvalue(), subjects, sources


def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    kids.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(
                        int(entry)
                    )
            except OSError:
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _peak_mib(root: int) -> float:
    """The largest peak resident size (VmHWM) among a process and its descendants."""
    peak = 0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return round(peak / 1024, 1)


def _wait(fn: Any, done: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if done(value):
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out; last: {json.dumps(value, default=str)[:500]}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _phase_seconds(db_url: str, ids: list[str], start: str, end: str) -> list[float]:
    """Per request: seconds from its status `start` (or receipt) to `end`, from the audit
    log's hashed timestamps."""
    sql = (
        "SELECT entity_id, action, data->>'to', at FROM audit_events"
        " WHERE entity_type = 'deletion_request' AND entity_id = ANY(%s)"
    )
    at: dict[tuple[str, str], Any] = {}
    with psycopg.connect(_plain(db_url)) as conn:
        for eid, action, to, when in conn.execute(sql, (ids,)):
            status = "received" if action == "request.received" else to
            at.setdefault((eid, status), when)
    return [
        (at[(i, end)] - at[(i, start)]).total_seconds()
        for i in ids
        if (i, start) in at and (i, end) in at
    ]


def run_size(n_records: int, shards: int, n_requests: int) -> dict[str, Any]:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", PG_DEFAULT)
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", REDIS_DEFAULT).rstrip("/")
    name = f"palimpsest_b8_{uuid.uuid4().hex[:8]}"
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
        "PALIMPSEST_LOG_LEVEL": "WARNING",
    } | production_secrets()
    blob, subjects, sources = dataset(n_records)
    out: dict[str, Any] = {"records": n_records, "shards": shards, "slices": 4}
    try:
        with tempfile.TemporaryDirectory(prefix="b8-") as tmp:
            stack = LocalStack(Path(tmp) / "stack", env=env)
            stack.start()
            stack.start_worker(name="worker-2", beat=False)
            try:
                key = stack.create_key("admin", "b8")
                admin = httpx.Client(
                    base_url=stack.base_url,
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=600,
                )
                spec = {
                    "name": "b8",
                    "subject_column": "person",
                    "label_column": "label",
                    "source_column": "source",
                }
                with psycopg.connect(_plain(db_url)) as conn:
                    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
                empty = int(row[0]) if row else 0  # the schema, before any data
                t0 = time.perf_counter()
                r = admin.post(
                    "/v1/datasets",
                    files={"file": ("b8.parquet", blob, "application/octet-stream")},
                    data={"spec": json.dumps(spec)},
                )
                assert r.status_code in (201, 202), r.text
                if r.status_code == 202:  # above the inline size: a worker ingests it
                    ds = _wait(
                        lambda: admin.get(f"/v1/datasets/{r.json()['id']}").json(),
                        lambda d: d["status"] in ("ready", "failed"),
                        timeout=7200,
                    )
                    assert ds["status"] == "ready", ds
                out["ingest_path"] = "api" if r.status_code == 201 else "worker"
                out["ingest_records_per_s"] = round(n_records / (time.perf_counter() - t0), 1)
                body = {
                    "name": "b8",
                    "dataset_id": r.json()["id"],
                    "architecture": {"kind": "mlp", "hidden": [16]},
                    "training": {"epochs": 2, "batch_size": 256, "lr": 0.01, "seed": 8},
                    "unlearning": {"mode": "sisa", "shards": shards, "slices": 4},
                    "verification": {"utility_max_drop": 0.2},
                    "batching": {"min_batch": n_requests, "max_wait_seconds": 60},
                }
                t0 = time.perf_counter()
                r = admin.post("/v1/models", json=body)
                assert r.status_code == 202, r.text
                job = _wait(
                    lambda: admin.get(f"/v1/jobs/{r.json()['job_id']}").json(),
                    lambda j: j["status"] in ("succeeded", "failed"),
                    timeout=7200,
                )
                assert job["status"] == "succeeded", job
                out["training_seconds"] = round(time.perf_counter() - t0, 1)

                rng = random.Random(1)
                picks = rng.sample(subjects, n_requests + 100)
                chosen, probe = picks[:n_requests], picks[n_requests:]
                lineage = []
                for sid in probe:
                    t = time.perf_counter()
                    lr = admin.get(f"/v1/subjects/{sid}/lineage")
                    lineage.append(time.perf_counter() - t)
                    assert lr.status_code == 200, lr.text
                out["lineage_p50_ms"] = round(_pct(lineage, 0.5) * 1000, 1)
                out["lineage_p99_ms"] = round(_pct(lineage, 0.99) * 1000, 1)

                ids = []
                for sid in chosen:
                    rr = admin.post(
                        "/v1/deletion-requests", json={"kind": "subject", "subject_id": sid}
                    )
                    assert rr.status_code == 202, rr.text
                    ids.append(rr.json()["id"])
                src = next(s for s in sources)  # a source of the dataset
                rr = admin.post("/v1/deletion-requests", json={"kind": "source", "source": src})
                assert rr.status_code in (202, 404), rr.text
                if rr.status_code == 202:
                    ids.append(rr.json()["id"])
                views = [
                    _wait(
                        lambda i=i: admin.get(f"/v1/deletion-requests/{i}").json(),
                        lambda d: d["status"] in TERMINAL,
                        timeout=7200,
                    )
                    for i in ids
                ]
                out["requests"] = len(ids)
                out["completed"] = sum(v["status"] == "completed" for v in views)
                jobs = {m["job_id"] for v in views for m in v["models"] if m.get("job_id")}
                per_shard = []
                for jid in jobs:
                    j = admin.get(f"/v1/jobs/{jid}").json()
                    shards_done = len(j["result"].get("unlearning", {}).get("affected_shards", []))
                    wall = (j.get("cost") or {}).get("wall_seconds")
                    if shards_done and wall:
                        per_shard.append(float(wall) / shards_done)
                out["unlearning_jobs"] = len(jobs)
                out["unlearning_seconds_per_shard"] = (
                    round(statistics.mean(per_shard), 2) if per_shard else None
                )
                plan = _phase_seconds(db_url, ids, "received", "planned")
                erase = _phase_seconds(db_url, ids, "erasing", "completed")
                out["planning_p50_s"] = round(_pct(plan, 0.5), 2)
                out["erasure_p50_s"] = round(_pct(erase, 0.5), 2)
                api, w1, w2 = (p.pid for p in stack.procs)
                out["peak_mib"] = {
                    "api": _peak_mib(api),
                    "worker-1": _peak_mib(w1),
                    "worker-2": _peak_mib(w2),
                }
                with psycopg.connect(_plain(db_url)) as conn:
                    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
                grown = (int(row[0]) if row else 0) - empty
                out["db_mib_per_million_records"] = round(grown / 2**20 * 1e6 / n_records, 1)
            finally:
                stack.stop()
    finally:
        with psycopg.connect(_plain(pg), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = [
        ("records", "records"),
        ("ingest_records_per_s", "ingest records/s"),
        ("training_seconds", "training s"),
        ("planning_p50_s", "planning p50 s"),
        ("lineage_p50_ms", "lineage p50 ms"),
        ("lineage_p99_ms", "lineage p99 ms"),
        ("unlearning_seconds_per_shard", "unlearn s/shard"),
        ("erasure_p50_s", "erasure p50 s"),
        ("db_mib_per_million_records", "DB MiB/M rec"),
    ]
    print("B8 scale: production shape, SISA, 2 workers")
    print("  " + " | ".join(f"{label:>15}" for _, label in keys) + " | peak MiB api/w1/w2")
    for r in rows:
        peak = r["peak_mib"]
        print(
            "  "
            + " | ".join(f"{r.get(k)!s:>15}" for k, _ in keys)
            + f" | {peak['api']}/{peak['worker-1']}/{peak['worker-2']}"
        )


def main(
    quick: bool = False,
    records: list[int] | None = None,
    shards: int | None = None,
    requests: int | None = None,
) -> list[dict[str, Any]] | None:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", PG_DEFAULT)
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", REDIS_DEFAULT)
    if not (_reachable(pg, 5432) and _reachable(redis_url, 6379)):
        print(f"B8 skipped: PostgreSQL ({pg}) and Redis ({redis_url}) must both answer")
        return None
    sizes = [10_000] if quick else (records or [100_000, 300_000, 1_000_000])
    s = shards or (8 if quick else 32)
    rows = [run_size(n, s, requests or (10 if quick else 100)) for n in sizes]
    print_table(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--records", type=int, nargs="+")
    parser.add_argument("--shards", type=int, help="SISA shards (default 32; 8 with --quick)")
    parser.add_argument("--requests", type=int, help="subject requests (default 100)")
    a = parser.parse_args()
    main(quick=a.quick, records=a.records, shards=a.shards, requests=a.requests)
