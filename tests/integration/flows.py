"""A client that only knows API.md: helpers shared by the integration tests."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import httpx
import numpy as np

TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}


def make_csv(n_subjects: int = 300, per_subject: int = 5, seed: int = 0) -> bytes:
    """Seeded people with a few rows each, four sources, numeric and categorical columns."""
    rng = np.random.default_rng(seed)
    lines = ["person,district,age,score,home_language,track,passed"]
    for s in range(n_subjects):
        district = ["north", "south", "east", "west"][s % 4]
        lang = rng.choice(["en", "es", "fr"])
        for _ in range(per_subject):
            age = rng.integers(15, 19)
            score = rng.normal()
            track = rng.choice(["a", "b"])
            logit = 1.5 * score + (0.8 if track == "a" else -0.4) + rng.normal(scale=0.5)
            lines.append(f"p{s:04d},{district},{age},{score:.4f},{lang},{track},{int(logit > 0)}")
    return ("\n".join(lines) + "\n").encode()


def wait_for(fn: Any, done: Any, timeout: float = 240.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if done(last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out; last state: {json.dumps(last, default=str)[:2000]}")


def ingest(client: httpx.Client, name: str, data: bytes) -> dict[str, Any]:
    spec = {
        "name": name,
        "subject_column": "person",
        "label_column": "passed",
        "source_column": "district",
        "group_columns": ["home_language"],
    }
    r = client.post(
        "/v1/datasets",
        files={"file": (f"{name}.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(spec)},
    )
    assert r.status_code in (201, 202), r.text
    if r.status_code == 202:
        # A large file: ingested by a worker job; the dataset is usable once ready.
        ready = wait_for(
            lambda: client.get(f"/v1/datasets/{r.json()['id']}").json(),
            lambda d: d["status"] != "ingesting",
        )
        assert ready["status"] == "ready", ready
        return dict(ready)
    return dict(r.json())


def train(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/models", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json(),
        lambda j: j["status"] in ("succeeded", "failed"),
    )
    assert job["status"] == "succeeded", job
    return dict(client.get(f"/v1/models/{body['name']}").json())


def erase(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/deletion-requests", json=body)
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    return dict(
        wait_for(
            lambda: client.get(f"/v1/deletion-requests/{rid}").json(),
            lambda d: d["status"] in TERMINAL,
        )
    )
