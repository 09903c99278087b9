"""Benchmark B4: many subject requests against one SISA model, batched vs one job each.

Run with `python -m bench.b4_batching` (`--quick` for a small smoke run, `--requests N`
to choose the count; the issue's figure is 1,000). Both sides run the whole service as
it runs in production, measured in the same run on the same seeded data:

* A fresh embedded stack each (SQLite database, SQLite broker, one `palimpsest worker
  --beat` process with the solo pool, as `make demo` runs it), the same dataset (students
  with 2-6 assessments each, from the demo's generator) and the same SISA model (an MLP,
  8 shards x 4 slices, sharded by subject).
* The same N subject requests (distinct students, in the same order) are posted over
  HTTP as fast as the API takes them; each is planned, unlearned, verified (lineage,
  utility, forgetting, fairness), erased and certified by the worker.
* **Batched**: the model's batching policy `{"min_batch": B, "window_seconds": 0,
  "max_wait_seconds": 20}`: a job starts once it holds B requests, or 20 s after its
  first one. **One job each**: `{"max_batch": 1}`, every request its own job.
* Measured: the makespan (first request posted to last completed), requests completed per
  hour of makespan, total worker time (the sum of the jobs' wall seconds, which is the
  worker's busy time on unlearning and verification; planning and erasure are in the
  makespan), jobs, and the shards and slice stages retrained.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from app.demo import learning_dataset
from app.stack import LocalStack

RESULTS = Path(__file__).resolve().parent / "results" / "b4.json"
TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}


@dataclass
class Outcome:
    label: str
    requests: int
    completed: int
    other_status: dict[str, int]
    # For requests not completed: the verification checks that failed, counted, and the
    # numbers of each failing report.
    failed_checks: dict[str, int]
    failures: list[dict[str, Any]]
    makespan_seconds: float
    requests_per_hour: float
    jobs: int
    worker_seconds: float
    shards_retrained: int
    slice_stages_retrained: int


def _model_body(dataset_id: str, batching: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "b4",
        "dataset_id": dataset_id,
        "architecture": {"kind": "mlp", "hidden": [16]},
        "training": {"epochs": 3, "batch_size": 128, "lr": 0.01, "seed": 3},
        "unlearning": {"mode": "sisa", "shards": 8, "slices": 4, "sharding": "subject"},
        "batching": batching,
    }


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish")


def _status_counts(client: httpx.Client) -> dict[str, int]:
    """Requests by status, from the Prometheus endpoint (one cheap query)."""
    counts: dict[str, int] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("palimpsest_requests{status="):
            status = line.split('"')[1]
            counts[status] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def run_side(
    label: str, folder: Path, data: bytes, subjects: list[str], batching: dict[str, Any]
) -> Outcome:
    stack = LocalStack(
        folder,
        env={
            "PALIMPSEST_DEVICE": "cpu",
            "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "PALIMPSEST_BATCH_RELEASE_INTERVAL": "1",
            "PALIMPSEST_LOG_LEVEL": "WARNING",
        },
    )
    with stack:
        admin = httpx.Client(
            base_url=stack.base_url,
            headers={"Authorization": f"Bearer {stack.create_key('admin', 'bench')}"},
            timeout=60,
        )
        spec = {
            "name": "students",
            "subject_column": "student",
            "label_column": "passed",
            "source_column": "district",
            "group_columns": ["home_language"],
        }
        r = admin.post(
            "/v1/datasets",
            files={"file": ("students.csv", io.BytesIO(data), "text/csv")},
            data={"spec": json.dumps(spec)},
        )
        r.raise_for_status()
        r = admin.post("/v1/models", json=_model_body(r.json()["id"], batching))
        r.raise_for_status()
        trained = _wait_job(admin, r.json()["job_id"])
        if trained["status"] != "succeeded":
            raise RuntimeError(f"training failed: {trained.get('error')}")

        t0 = time.time()

        def post(sid: str) -> str:
            resp = admin.post(
                "/v1/deletion-requests",
                json={"kind": "subject", "subject_id": sid},
                headers={"Idempotency-Key": f"b4-{sid}"},
            )
            resp.raise_for_status()
            rid: str = resp.json()["id"]
            return rid

        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(post, subjects))
        posted = time.time() - t0
        print(f"  {label}: {len(ids)} requests posted in {posted:.1f} s", flush=True)
        last_report = 0.0
        while True:
            counts = _status_counts(admin)
            done = sum(counts.get(s, 0) for s in TERMINAL)
            if time.time() - last_report > 30:
                print(f"  {label}: {done}/{len(ids)} finished", flush=True)
                last_report = time.time()
            if done >= len(ids):
                break
            if time.time() - t0 > 6 * 3600:
                raise TimeoutError(f"{label}: only {done} of {len(ids)} requests finished")
            time.sleep(1.0)
        views = [admin.get(f"/v1/deletion-requests/{rid}").json() for rid in ids]
        finished = [
            datetime.fromisoformat(v["completed_at"]).timestamp()
            for v in views
            if v.get("completed_at")
        ]
        makespan = (max(finished) if finished else time.time()) - t0
        statuses: dict[str, int] = {}
        for v in views:
            statuses[v["status"]] = statuses.get(v["status"], 0) + 1
        job_ids = sorted({m["job_id"] for v in views for m in v["models"] if m.get("job_id")})
        worker = 0.0
        shards = stages = 0
        for job_id in job_ids:
            job = admin.get(f"/v1/jobs/{job_id}").json()
            worker += float(job["cost"].get("wall_seconds") or 0.0)
            unlearning = job["result"].get("unlearning", {})
            shards += len(unlearning.get("affected_shards", []))
            stages += sum(int(n) for n in unlearning.get("slices_retrained", {}).values())
            # A fallback retrain (if verification asked for one) is worker time too.
            retrain = job["result"].get("retrain_job")
            if retrain:
                worker += float(
                    admin.get(f"/v1/jobs/{retrain}").json()["cost"].get("wall_seconds") or 0.0
                )
        failed_checks: dict[str, int] = {}
        failures: dict[str, dict[str, Any]] = {}
        for v in views:
            if v["status"] == "completed":
                continue
            for m in v["models"]:
                if not m.get("report_id"):
                    continue
                report = admin.get(f"/v1/reports/{m['report_id']}").json()
                for name, check in report["checks"].items():
                    if not check["passed"]:
                        failed_checks[name] = failed_checks.get(name, 0) + 1
                        numbers = {
                            k: v
                            for k, v in check["metrics"].items()
                            if isinstance(v, int | float) or k in ("candidate", "reference")
                        }
                        failures.setdefault(m["report_id"], {"check": name, **numbers})
        completed = statuses.get("completed", 0)
        return Outcome(
            label=label,
            requests=len(ids),
            completed=completed,
            other_status={k: n for k, n in statuses.items() if k != "completed"},
            failed_checks=failed_checks,
            failures=list(failures.values()),
            makespan_seconds=round(makespan, 1),
            requests_per_hour=round(completed / makespan * 3600, 1) if makespan > 0 else 0.0,
            jobs=len(job_ids),
            worker_seconds=round(worker, 1),
            shards_retrained=shards,
            slice_stages_retrained=stages,
        )


def main(quick: bool = False, requests: int | None = None, min_batch: int | None = None) -> None:
    n = requests or (40 if quick else 1000)
    batch = min_batch or max(2, min(100, n // 10))
    n_subjects = max(600, int(n * 1.5))
    data = learning_dataset(n_subjects, seed=4)
    # The same distinct students for both sides, spread over the whole population.
    step = n_subjects / n
    subjects = [f"s{int(i * step):05d}" for i in range(n)]
    print(
        f"B4: {n} subject requests, one SISA model (MLP, 8 shards x 4 slices), "
        f"{n_subjects} students; batched (min_batch {batch}) vs one job each"
    )
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="palimpsest-b4-") as tmp:
        for label, policy in (
            ("batched", {"min_batch": batch, "window_seconds": 0, "max_wait_seconds": 20}),
            ("one job each", {"max_batch": 1}),
        ):
            t = time.perf_counter()
            outcomes.append(
                run_side(label, Path(tmp) / label.replace(" ", "-"), data, subjects, policy)
            )
            print(f"  {label}: done in {time.perf_counter() - t:.0f} s", flush=True)
    b, one = outcomes
    header = (
        f"{'':14}{'requests':>9}{'completed':>10}{'makespan s':>11}{'req/hour':>10}"
        f"{'jobs':>6}{'worker s':>10}{'shards':>8}{'stages':>8}"
    )
    print(header)
    for o in outcomes:
        print(
            f"{o.label:14}{o.requests:>9}{o.completed:>10}{o.makespan_seconds:>11.1f}"
            f"{o.requests_per_hour:>10.0f}{o.jobs:>6}{o.worker_seconds:>10.1f}"
            f"{o.shards_retrained:>8}{o.slice_stages_retrained:>8}"
        )
        if o.other_status:
            print(f"{'':14}not completed: {o.other_status}, failed checks {o.failed_checks}")
    ratios = {
        "throughput": b.requests_per_hour / one.requests_per_hour if one.requests_per_hour else 0,
        "worker_time": one.worker_seconds / b.worker_seconds if b.worker_seconds else 0,
        "shards": one.shards_retrained / b.shards_retrained if b.shards_retrained else 0,
    }
    print(
        f"batched vs one job each: {ratios['throughput']:.1f}x the requests per hour, "
        f"{ratios['worker_time']:.1f}x less worker time, "
        f"{ratios['shards']:.1f}x fewer shard retrains"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"requests": n, "min_batch": batch, "outcomes": [asdict(o) for o in outcomes]}
            | {"ratios": ratios},
            indent=2,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--min-batch", type=int, default=None)
    args = parser.parse_args()
    main(quick=args.quick, requests=args.requests, min_batch=args.min_batch)
