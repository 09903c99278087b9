"""Benchmark E2: intake under load with webhook subscribers, as issue 11 measured it.

Run with `python -m bench.e2_intake_webhooks` (`--quick` for 400 requests). 2,000
`POST /v1/deletion-requests` (portal key, unique Idempotency-Keys, subjects the dataset
holds) from 20 keep-alive connections on 127.0.0.1, against a real stack (API processes
and one worker, as `palimpsest demo` runs them) with 2 and then 20 webhook endpoints
subscribed to every event (a loopback receiver that answers 204). Embedded (SQLite,
SQLite broker) and, when they answer, PostgreSQL + Redis. Reported: requests/s, p50 and
p99 latency, non-202 answers, and right after the load the outbox rows the API wrote per
request and what waits on the `default` and `webhooks` queues (deliveries never queue in
front of planning and erasure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import create_engine, text

from app.core.broker import queue_depth
from app.stack import LocalStack
from bench import loadgen, production_secrets

RESULTS = Path(__file__).resolve().parent / "results" / "e2.json"
EVENTS = [
    "request.received",
    "request.status_changed",
    "request.completed",
    "request.needs_review",
    "request.overdue",
    "job.failed",
    "model.promoted",
]


class _Quiet(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def _dataset(n_subjects: int) -> bytes:
    lines = ["person,district,age,score,passed"]
    for s in range(n_subjects):
        lines.append(f"p{s:05d},d{s % 20},{15 + s % 5},{(s % 7) / 3:.3f},{s % 2}")
    return ("\n".join(lines) + "\n").encode()


def _reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def run_once(
    shape: str, endpoints: int, n_requests: int, clients: int, folder: Path
) -> dict[str, Any]:
    env = {
        "PALIMPSEST_LOG_LEVEL": "WARNING",
        "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        # API processes as deployed: one per core.
        "PALIMPSEST_API_WORKERS": str(len(os.sched_getaffinity(0))),
    }
    dbname = None
    if shape == "postgres":
        dbname = f"palimpsest_e2_{uuid.uuid4().hex[:10]}"
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{dbname}"')
        db = int(uuid.uuid4().int % 12) + 3
        env |= {
            "PALIMPSEST_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}",
            "PALIMPSEST_BROKER_URL": f"redis://127.0.0.1:6379/{db}",
            "PALIMPSEST_RESULT_BACKEND": f"redis://127.0.0.1:6379/{db}",
        } | production_secrets()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    stack = LocalStack(folder, env=env)
    try:
        with stack:
            admin = httpx.Client(
                base_url=stack.base_url,
                headers={"Authorization": f"Bearer {stack.create_key('admin', 'e2')}"},
                timeout=120,
            )
            portal = stack.create_key("portal", "e2-portal")
            spec = {"name": "e2", "subject_column": "person", "label_column": "passed"}
            r = admin.post(
                "/v1/datasets",
                files={"file": ("e2.csv", _dataset(n_requests), "text/csv")},
                data={"spec": json.dumps(spec)},
            )
            r.raise_for_status()
            url = f"http://127.0.0.1:{receiver.server_port}/hook"
            for _ in range(endpoints):
                admin.post("/v1/webhooks", json={"url": url, "events": EVENTS}).raise_for_status()
            host = f"127.0.0.1:{stack.port}"
            requests = [
                loadgen.post_json(
                    "/v1/deletion-requests",
                    {"Authorization": f"Bearer {portal}", "Idempotency-Key": f"e2-{i}"},
                    {"kind": "subject", "subject_id": f"p{i:05d}"},
                    host,
                )
                for i in range(n_requests)
            ]
            started = asyncio.get_event_loop_policy().new_event_loop()
            t0 = started.time()
            tally = started.run_until_complete(
                loadgen.run_all(
                    "127.0.0.1", stack.port, clients, requests, lambda _r: False, lambda *_: None
                )
            )
            wall = started.time() - t0
            started.close()
            depth = queue_depth(stack.env["PALIMPSEST_BROKER_URL"])
            engine = create_engine(stack.env["PALIMPSEST_DATABASE_URL"])
            with engine.connect() as conn:
                events = conn.execute(text("SELECT count(*) FROM webhook_events")).scalar()
                received = conn.execute(
                    text(
                        "SELECT count(*) FROM webhook_events WHERE event_type = 'request.received'"
                    )
                ).scalar()
            engine.dispose()
    finally:
        receiver.shutdown()
        if dbname:
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    ok = tally.statuses.get(202, 0)
    return {
        "shape": shape,
        "endpoints": endpoints,
        "requests": n_requests,
        "clients": clients,
        "requests_per_second": round(len(tally.latencies) / wall, 1),
        "p50_ms": round(1000 * tally.percentile(0.5), 1),
        "p99_ms": round(1000 * tally.percentile(0.99), 1),
        "accepted": ok,
        "other_answers": {str(k): v for k, v in tally.statuses.items() if k != 202},
        "transport_errors": tally.transport_errors,
        "received_events_written": received,
        "events_so_far": events,
        "queues_after_load": depth,
    }


def main(quick: bool = False, out: Path | None = None) -> list[dict[str, Any]]:
    n = 400 if quick else 2000
    shapes = ["embedded"]
    if _reachable("127.0.0.1", 5432) and _reachable("127.0.0.1", 6379):
        shapes.append("postgres")
    results = []
    for shape in shapes:
        for endpoints in (2, 20):
            with tempfile.TemporaryDirectory(prefix="palimpsest-e2-") as tmp:
                res = run_once(shape, endpoints, n, 20, Path(tmp))
            results.append(res)
            print(
                f"  {shape:8s} {endpoints:2d} endpoints: {res['requests_per_second']:7.1f} req/s,"
                f" p50 {res['p50_ms']:7.1f} ms, p99 {res['p99_ms']:7.1f} ms,"
                f" accepted {res['accepted']}/{n}, other {res['other_answers']},"
                f" queues after {res['queues_after_load']}",
                flush=True,
            )
    path = out or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print("E2: intake with webhook subscribers (issue 11, item 8)")
    main(parser.parse_args().quick)
