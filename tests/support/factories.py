"""Factories: API keys, synthetic tabular files, dataset uploads."""

from __future__ import annotations

import csv
import io
import json
import random
from typing import Any

from fastapi.testclient import TestClient

CATEGORIES = ("red", "green", "blue")
SOURCES = ("clinic-a", "clinic-b", "registry")


def create_key(role: str, name: str | None = None) -> str:
    """A new API key for `role` in the configured database; returns the raw key."""
    from app.core.db import session_scope
    from app.keys import create_key as _create

    with session_scope() as s:
        _, raw = _create(s, role, name or f"test-{role}")
    return raw


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_rows(
    n_subjects: int = 20,
    rows_per_subject: int = 3,
    seed: int = 0,
    labels: tuple[str, ...] = ("no", "yes"),
    subject_prefix: str = "subj",
) -> list[dict[str, Any]]:
    """Seeded synthetic rows: subject, source, two numeric and one categorical feature,
    an integer region code (categorical when declared) and a label tied to the features."""
    rng = random.Random(seed)
    rows = []
    for s in range(n_subjects):
        source = SOURCES[s % len(SOURCES)]
        for _ in range(rows_per_subject):
            age = round(rng.uniform(18, 90), 1)
            score = round(rng.gauss(0, 1), 4)
            colour = rng.choice(CATEGORIES)
            signal = score + (0.5 if colour == "red" else 0.0) + (age - 50) / 40
            label = labels[int(signal > 0) % len(labels)] if len(labels) > 1 else labels[0]
            rows.append(
                {
                    "subject": f"{subject_prefix}-{s:04d}",
                    "source": source,
                    "age": age,
                    "score": score,
                    "colour": colour,
                    "region": rng.randint(1, 4),
                    "label": label,
                }
            )
    return rows


def make_csv(rows: list[dict[str, Any]] | None = None, **kwargs: Any) -> bytes:
    rows = rows if rows is not None else make_rows(**kwargs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def make_parquet(rows: list[dict[str, Any]] | None = None, **kwargs: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows if rows is not None else make_rows(**kwargs)
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def dataset_spec(name: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "subject_column": "subject",
        "label_column": "label",
        "source_column": "source",
        "categorical_columns": ["region"],
        "group_columns": ["colour"],
    }
    spec.update(overrides)
    return spec


def post_dataset(
    client: TestClient,
    key: str,
    data: bytes,
    spec: dict[str, Any] | str,
    filename: str = "data.csv",
) -> Any:
    """The raw response of `POST /v1/datasets` (spec may be a dict or a raw string)."""
    raw_spec = spec if isinstance(spec, str) else json.dumps(spec)
    return client.post(
        "/v1/datasets",
        headers=auth(key),
        files={"file": (filename, data, "application/octet-stream")},
        data={"spec": raw_spec},
    )


def upload_dataset(
    client: TestClient,
    key: str,
    name: str,
    data: bytes | None = None,
    filename: str = "data.csv",
    **spec_overrides: Any,
) -> dict[str, Any]:
    """Upload a dataset that must be accepted; returns the 201 body."""
    resp = post_dataset(
        client,
        key,
        data if data is not None else make_csv(),
        dataset_spec(name, **spec_overrides),
        filename,
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def assert_error(resp: Any, status: int | None = None, code: str | None = None) -> dict[str, Any]:
    """The contract's error shape: `{"error": {"code": str, "message": str}}`, a 4xx."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    return dict(err)


MODEL_DEFAULTS: dict[str, Any] = {
    "training": {"epochs": 2, "batch_size": 32},
    "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
    "verification": {"utility_max_drop": 1.0},
}


def create_model(
    client: Any, admin: str, dataset_id: str, name: str = "m", *, train: bool = True, **body: Any
) -> dict[str, Any]:
    """`POST /v1/models` with small defaults (any top-level field overridden by `body`);
    with `train`, its first version is trained in-process, as the worker's task would.
    Returns the 202 body."""
    resp = client.post(
        "/v1/models",
        headers=auth(admin),
        json={"name": name, "dataset_id": dataset_id, **MODEL_DEFAULTS, **body},
    )
    assert resp.status_code == 202, resp.text
    created: dict[str, Any] = resp.json()
    if train:
        from app.pipeline import training

        training.run_training(created["job_id"])
    return created


def plan_and_run(client: Any, admin: str, request_id: str) -> dict[str, Any]:
    """Plan a request and run its first model's job in-process (the worker's task
    bodies); returns the request's view afterwards."""
    from app.core.db import session_scope
    from app.pipeline import unlearning
    from app.requests import lifecycle

    with session_scope() as s:
        lifecycle.plan(s, request_id)
    view = client.get(f"/v1/deletion-requests/{request_id}", headers=auth(admin)).json()
    unlearning.run_unlearning(view["models"][0]["job_id"], lifecycle.EVENTS)
    out: dict[str, Any] = client.get(
        f"/v1/deletion-requests/{request_id}", headers=auth(admin)
    ).json()
    return out


def run_mitigation(
    client: Any, headers: dict[str, str], request_id: str, mitigation: str | None = None
) -> str:
    """Ask for a mitigation of a request held for review and run its retrain job
    in-process (the worker's task body); asserts it succeeded and returns the job id."""
    from app.core.db import session_scope
    from app.models import Job
    from app.pipeline import retraining
    from app.requests.lifecycle import EVENTS

    body: dict[str, Any] = {"action": "mitigate"}
    if mitigation is not None:
        body["mitigation"] = mitigation
    r = client.post(f"/v1/deletion-requests/{request_id}/review", headers=headers, json=body)
    assert r.status_code == 200, r.text
    job_id = str(r.json()["models"][0]["job_id"])
    retraining.run_retrain(job_id, EVENTS)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded", job and job.error
    return job_id
