"""Helpers for the dashboard tests: browsers (clients with their own cookie jar), log-in,
CSRF tokens scraped from pages, and rows seeded straight into the database."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Dataset, DeletionRequest, Job, MLModel
from app.models.base import utcnow
from tests.support.app_env import AppEnv

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def browser(env: AppEnv, base_url: str = "http://testserver") -> TestClient:
    """A fresh client (cookie jar) on the same app; redirects are not followed."""
    return TestClient(
        env.client.app, base_url=base_url, raise_server_exceptions=False, follow_redirects=False
    )


def login(env: AppEnv, key: str) -> TestClient:
    client = browser(env)
    r = client.post("/admin/login", data={"key": key})
    assert r.status_code == 303, r.text
    return client


def csrf_token(client: TestClient, path: str = "/admin") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    m = CSRF.search(page.text)
    assert m is not None, "no CSRF token on the page"
    return m.group(1)


def seed_model(s: Session, name: str, config: dict[str, Any] | None = None) -> MLModel:
    ds = Dataset(
        name=f"ds-{name}", spec={}, schema={}, n_partitions=0, artifact_prefix=f"datasets/{name}"
    )
    s.add(ds)
    s.flush()
    model = MLModel(
        name=name,
        dataset_id=ds.id,
        status="ready",
        config=config
        or {
            "architecture": {"kind": "logreg"},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
            "resolved": {},
        },
    )
    s.add(model)
    s.flush()
    return model


def seed_request(
    s: Session,
    *,
    status: str = "received",
    due_in: timedelta = timedelta(days=30),
    completed_at: datetime | None = None,
    kind: str = "source",
    source: str | None = "clinic-a",
    received_at: datetime | None = None,
) -> DeletionRequest:
    now = utcnow()
    req = DeletionRequest(
        kind=kind,
        status=status,
        source=source,
        received_at=received_at or now - timedelta(days=1),
        due_at=now + due_in,
        completed_at=completed_at,
        n_records=3,
    )
    s.add(req)
    s.flush()
    return req


def seed_job(
    s: Session,
    model: MLModel,
    *,
    kind: str = "unlearn",
    status: str = "succeeded",
    progress: float = 1.0,
    cost: dict[str, Any] | None = None,
    error: str | None = None,
) -> Job:
    job = Job(
        kind=kind,
        status=status,
        progress=progress,
        model_id=model.id,
        method="sisa",
        cost=cost or {},
        error=error,
    )
    s.add(job)
    s.flush()
    return job
