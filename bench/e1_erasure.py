"""Benchmark E1: one subject erased end to end through the API from a SISA model, against
training the same network monolithically with the same `training` body.

Run with `python -m bench.e1_erasure` (`--quick` for a small smoke run). Both sides run in
one embedded stack (SQLite, SQLite broker, one `palimpsest worker --beat` process, solo
pool) on the same seeded data, as `make demo` runs it:

* Data: 45,000 rows shaped like UCI Adult (six numeric columns on their own scales, eight
  categorical ones with Adult's level counts, a noisy income label with interactions),
  1-3 rows per subject, `sex` and `race` as group columns. Uploaded twice as CSV, once
  per model, the second copy's subjects under other names, so that an erasure reaches
  only the SISA model.
* SISA: MLP hidden [64], 16 shards x 8 slices by subject. Monolithic: the same MLP and
  the same `training` body, with no reference models (`reference_models: 0`), so its
  training job trains exactly one network.
* Workers are warm, as deployed: the worker keeps the dataset's converted rows, its
  loaded shard models and the lineage layout from one job to the next
  (docs/operations.md, "Warm workers"); the first job after training reads the
  lineage and loads the models itself. Which jobs found the rows warm is printed.
* Timed: the SISA model's unlearning job for one subject (job wall time: start to
  conclusion, including loading, the retraining of the affected shard, every
  verification check and concluding), for 8 subjects one after another (the slice a
  subject's records sit in decides how much of its shard retrains, so the mean counts),
  against the monolithic model's training job (job wall time). The phase breakdown of
  both comes from the jobs' `result.phases`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.stack import LocalStack

RESULTS = Path(__file__).resolve().parent / "results" / "e1.json"
# B1's training body (E=45 passes over each record, batch 256): the same for both sides.
TRAINING = {"epochs": 45, "batch_size": 256, "lr": 0.003, "weight_decay": 0.0, "seed": 7}

_CATEGORIES = {
    "workclass": 8,
    "education": 16,
    "marital_status": 7,
    "occupation": 14,
    "relationship": 6,
    "race": 5,
    "sex": 2,
    "native_country": 41,
}


def adult_like(n_rows: int, seed: int, people: str = "person") -> bytes:
    """A seeded table with UCI Adult's shape: its columns, scales and level counts;
    subjects are named `{people}-NNNNNN`."""
    rng = np.random.default_rng(seed)
    age = rng.integers(17, 91, n_rows)
    fnlwgt = rng.lognormal(12, 0.5, n_rows).round()
    edu_num = rng.integers(1, 17, n_rows)
    gain = np.where(rng.random(n_rows) < 0.08, rng.lognormal(8, 1, n_rows), 0).round()
    loss = np.where(rng.random(n_rows) < 0.05, rng.lognormal(7, 0.5, n_rows), 0).round()
    hours = np.clip(rng.normal(40, 12, n_rows), 1, 99).round()
    cats = {c: rng.integers(0, k, n_rows) for c, k in _CATEGORIES.items()}
    logit = (
        0.04 * (age - 38)
        + 0.3 * (edu_num - 10)
        + 0.0004 * gain
        + 0.03 * (hours - 40)
        + 0.8 * (cats["marital_status"] == 2)
        - 0.6 * (cats["sex"] == 1)
        + 0.5 * (cats["occupation"] % 5 == 0) * (edu_num > 12)
        + 0.3 * np.sin(cats["education"])
        - 1.2
    )
    label = rng.random(n_rows) < 1 / (1 + np.exp(-logit))
    # 1-3 rows per subject.
    subject_of = np.repeat(np.arange(n_rows), rng.integers(1, 4, n_rows))[:n_rows]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(
        ["subject", "age", "fnlwgt", "education_num", "capital_gain", "capital_loss",
         "hours_per_week", *_CATEGORIES, "income"]
    )  # fmt: skip
    for i in range(n_rows):
        w.writerow(
            [
                f"{people}-{subject_of[i]:06d}",
                age[i],
                fnlwgt[i],
                edu_num[i],
                gain[i],
                loss[i],
                hours[i],
                *(f"{c}-{cats[c][i]}" for c in _CATEGORIES),
                ">50K" if label[i] else "<=50K",
            ]
        )
    return out.getvalue().encode()


def _wait(client: httpx.Client, path: str, done: set[str], timeout: float = 3600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if body["status"] in done:
            return body
        time.sleep(0.5)
    raise TimeoutError(path)


def _upload(client: httpx.Client, name: str, data: bytes) -> str:
    spec = {
        "name": name,
        "subject_column": "subject",
        "label_column": "income",
        "group_columns": ["sex", "race"],
    }
    r = client.post(
        "/v1/datasets",
        files={"file": (f"{name}.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(spec)},
        timeout=600,
    )
    r.raise_for_status()
    if r.status_code == 202:  # above the inline size: a worker job ingests it
        body = _wait(client, f"/v1/datasets/{r.json()['id']}", {"ready", "failed"}, 600)
        if body["status"] != "ready":
            raise RuntimeError(f"ingest failed: {body.get('error')}")
    return str(r.json()["id"])


def _train(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/models", json=body)
    r.raise_for_status()
    job: dict[str, Any] = _wait(client, f"/v1/jobs/{r.json()['job_id']}", {"succeeded", "failed"})
    if job["status"] != "succeeded":
        raise RuntimeError(f"training {body['name']} failed: {job.get('error')}")
    return job


def run(n_rows: int, shards: int, slices: int, folder: Path, n_subjects: int = 8) -> dict[str, Any]:
    data = adult_like(n_rows, seed=11)
    # The same rows for the monolithic model, held for other subject ids: a request for
    # a `person-` subject reaches the SISA model alone.
    mono_data = adult_like(n_rows, seed=11, people="mono")
    stack = LocalStack(
        folder,
        env={
            "PALIMPSEST_DEVICE": "cpu",
            "PALIMPSEST_LOG_LEVEL": "WARNING",
            "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        },
    )
    with stack:
        client = httpx.Client(
            base_url=stack.base_url,
            headers={"Authorization": f"Bearer {stack.create_key('admin', 'bench')}"},
            timeout=120,
        )
        arch = {"kind": "mlp", "hidden": [64]}
        t0 = time.perf_counter()
        sisa_ds = _upload(client, "adult-sisa", data)
        ingest = time.perf_counter() - t0
        mono_ds = _upload(client, "adult-mono", mono_data)
        sisa_train = _train(
            client,
            {
                "name": "adult-sisa",
                "dataset_id": sisa_ds,
                "architecture": arch,
                "training": TRAINING,
                "unlearning": {"mode": "sisa", "shards": shards, "slices": slices},
            },
        )
        mono_train = _train(
            client,
            {
                "name": "adult-mono",
                "dataset_id": mono_ds,
                "architecture": arch,
                "training": TRAINING,
                "unlearning": {"mode": "monolithic"},
                "verification": {"reference_models": 0},
            },
        )
        # Subjects whose rows trained the SISA model (test-split rows reach no shard),
        # erased one after another, each its own request and job: where a subject's
        # records sit (which slice) decides how much of its shard retrains, so the
        # figure is their mean.
        subjects: list[str] = []
        for k in range(400):
            sid = f"person-{k * 37:06d}"
            view = client.get(f"/v1/subjects/{sid}/lineage")
            if view.status_code == 200 and any(
                m["model"] == "adult-sisa" and m["shards"] for m in view.json()["models"]
            ):
                subjects.append(sid)
            if len(subjects) == n_subjects:
                break
        if not subjects:
            raise RuntimeError("no subject found in the SISA model's training split")
        jobs: list[dict[str, Any]] = []
        for sid in subjects:
            r = client.post("/v1/deletion-requests", json={"kind": "subject", "subject_id": sid})
            r.raise_for_status()
            req = _wait(
                client,
                f"/v1/deletion-requests/{r.json()['id']}",
                {"completed", "failed", "needs_review", "rejected"},
            )
            job = next(
                client.get(f"/v1/jobs/{m['job_id']}").json() | {"request": req["status"]}
                for m in req["models"]
                if m["model"] == "adult-sisa"
            )
            # What each check said (a request held for review says why).
            if job.get("report_id"):
                report = client.get(f"/v1/reports/{job['report_id']}").json()
                job["checks"] = {
                    name: {"status": c.get("status"), "reason": c.get("reason")}
                    for name, c in report.get("checks", {}).items()
                }
            jobs.append(job)
    walls = [float(j["cost"]["wall_seconds"]) for j in jobs]
    unlearn_wall = float(np.mean(walls))
    mono_wall = float(mono_train["cost"]["wall_seconds"])
    shares, phases_sum = [], {}
    for j, wall in zip(jobs, walls, strict=True):
        secs = j["result"].get("phases", {}).get("seconds", {})
        shares.append(sum(v for k, v in secs.items() if k.startswith("verify")) / wall)
        for k, v in secs.items():
            phases_sum[k] = phases_sum.get(k, 0.0) + v / len(jobs)
    return {
        "rows": n_rows,
        "shards": shards,
        "slices": slices,
        "training": TRAINING,
        "subjects": len(jobs),
        "request_statuses": sorted({j["request"] for j in jobs}),
        "ingest_seconds": round(ingest, 2),
        "sisa_training_job_seconds": float(sisa_train["cost"]["wall_seconds"]),
        "monolithic_training_job_seconds": mono_wall,
        "unlearning_job_seconds": [round(w, 3) for w in walls],
        "unlearning_job_seconds_mean": round(unlearn_wall, 3),
        "ratio": round(mono_wall / unlearn_wall, 2) if unlearn_wall else None,
        "verification_share": round(float(np.mean(shares)), 3),
        "unlearning_phases": {
            "seconds": {k: round(v, 4) for k, v in sorted(phases_sum.items())},
            "parquet_reads": jobs[0]["result"].get("phases", {}).get("parquet_reads"),
            # Per job: 1 where its rows came from the worker's warm copy (the dataset
            # kept from the job before), 0 where it read the Parquet.
            "warm_reads": [j["result"].get("phases", {}).get("warm_reads", 0) for j in jobs],
        },
        "monolithic_phases": mono_train["result"].get("phases", {}),
        "sisa_training_phases": sisa_train["result"].get("phases", {}),
        "checks": [j.get("checks", {}) for j in jobs],
        "slices_retrained": [
            j["result"].get("unlearning", {}).get("slices_retrained") for j in jobs
        ],
        "accuracy": {
            "sisa": sisa_train["result"]["metrics"]["test_accuracy"],
            "monolithic": mono_train["result"]["metrics"]["test_accuracy"],
        },
    }


def _print(res: dict[str, Any]) -> None:
    print("E1: one subject erased through the API (SISA) vs monolithic training")
    print(
        f"  {res['rows']:,} rows, S={res['shards']} R={res['slices']}, "
        f"training {json.dumps(res['training'])}; {res['subjects']} subjects, requests "
        f"{'/'.join(res['request_statuses'])}"
    )
    print(f"  monolithic training job: {res['monolithic_training_job_seconds']:8.2f} s")
    print(
        f"  SISA unlearning job:     {res['unlearning_job_seconds_mean']:8.2f} s (mean; each: "
        f"{', '.join(f'{w:.2f}' for w in res['unlearning_job_seconds'])})"
    )
    print(f"  ratio:                   {res['ratio']:8.2f}x   (target >= 10x)")
    print(f"  verification share:      {100 * (res['verification_share'] or 0):7.1f} %  (<= 15%)")
    print(f"  accuracy: SISA {res['accuracy']['sisa']:.4f}, monolithic "
          f"{res['accuracy']['monolithic']:.4f}")  # fmt: skip
    for label, key in (
        ("unlearning job", "unlearning_phases"),
        ("monolithic training job", "monolithic_phases"),
    ):
        ph = res[key]
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(ph.get("seconds", {}).items()))
        print(f"  phases of the {label}: {parts}; parquet reads {ph.get('parquet_reads')}")
    for i, checks in enumerate(res.get("checks", [])):
        held = {k: v for k, v in checks.items() if v.get("status") == "fail"}
        if held:
            print(f"  job {i + 1} failed checks: {json.dumps(held)}")
    warm = res["unlearning_phases"].get("warm_reads") or []
    print(
        f"  dataset rows from the worker's warm copy in {sum(warm)} of {len(warm)} unlearning "
        "jobs (the others read the Parquet once)"
    )


def main(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="palimpsest-e1-") as tmp:
        res = run(6000, 4, 4, Path(tmp)) if quick else run(45_000, 16, 8, Path(tmp))
    path = out or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    _print(res)
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
