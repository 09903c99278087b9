"""Real state for the dashboard, made the way a deployment makes it: over HTTP, by a real
API process and a real Celery worker (the embedded SQLite stack of `app.stack`).

Two small datasets with distinct subjects, so that a request reaches one model only:

- `clinic-visits` -> `visit-risk` (SISA): two subject requests and a feature request
  (`age`), all of which complete;
- `referrals` -> `referral-triage` and `claims` -> `claims-triage` (SISA,
  `require_approval`): every request on them waits in `needs_review` for an admin; one
  request each, one for a test to approve and one that stays in review.

`scans`, a zip of PNG images with a manifest, is a media dataset with no model (its page
shows the column kinds).

A webhook endpoint that refuses connections gives the webhooks page failed deliveries.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.stack import LocalStack
from tests.media import gen
from tests.support.factories import dataset_spec, make_csv

TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}


@dataclass
class Seeded:
    stack: LocalStack
    admin_key: str
    auditor_key: str
    portal_key: str
    completed: list[str] = field(default_factory=list)
    feature_request: str = ""
    to_approve: str = ""
    in_review: str = ""
    models: dict[str, str] = field(default_factory=dict)  # name -> training job id
    webhook_id: str = ""
    media_dataset: str = ""  # the id of `scans`

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.stack.base_url,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
            timeout=30,
        )


def wait_for(
    fn: Callable[[], dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 120.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = fn()
        if done(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out; last state: {json.dumps(last, default=str)[:2000]}")


def _dataset(admin: httpx.Client, name: str, data: bytes) -> str:
    r = admin.post(
        "/v1/datasets",
        files={"file": (f"{name}.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(dataset_spec(name))},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _model(admin: httpx.Client, name: str, dataset_id: str, approval: bool) -> str:
    r = admin.post(
        "/v1/models",
        json={
            "name": name,
            "dataset_id": dataset_id,
            "architecture": {"kind": "mlp", "hidden": [16]},
            "training": {"epochs": 3, "batch_size": 32, "lr": 0.02, "seed": 1},
            "unlearning": {"mode": "sisa", "shards": 3, "slices": 2, "sharding": "subject"},
            # Tiny test sets make accuracy and per-group rates noisy: the gates are wide
            # open so that the only way into review is the model's own require_approval.
            "verification": {
                "utility_max_drop": 1.0,
                "fairness_max_drop": 1.0,
                "forgetting_margin": 0.5,
                "min_group_size": 5,
                "require_approval": approval,
            },
        },
    )
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def _request(client: httpx.Client, subject: str) -> str:
    r = client.post(
        "/v1/deletion-requests",
        json={"kind": "subject", "subject_id": subject, "reason": "GDPR Art. 17"},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def settle(client: httpx.Client, rid: str, timeout: float = 120.0) -> dict[str, Any]:
    return wait_for(
        lambda: dict(client.get(f"/v1/deletion-requests/{rid}").json()),
        lambda d: d["status"] in TERMINAL,
        timeout,
    )


def job_state(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job once it has finished (succeeded or failed)."""

    def poll() -> dict[str, Any]:
        return dict(client.get(f"/v1/jobs/{job_id}").json())

    return wait_for(poll, lambda j: j["status"] in ("succeeded", "failed"))


def seed(stack: LocalStack) -> Seeded:
    s = Seeded(
        stack,
        admin_key=stack.create_key("admin", "dashboard-admin"),
        auditor_key=stack.create_key("auditor", "dashboard-auditor"),
        portal_key=stack.create_key("portal", "privacy-portal"),
    )
    admin, portal = s.client(), s.client(s.portal_key)
    r = admin.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/palimpsest-hook", "events": ["request.completed"]},
    )
    assert r.status_code == 201, r.text
    s.webhook_id = str(r.json()["id"])

    visits = _dataset(admin, "clinic-visits", make_csv(n_subjects=90, subject_prefix="visit"))
    referrals = _dataset(
        admin, "referrals", make_csv(n_subjects=60, seed=1, subject_prefix="referral")
    )
    scans = gen.rows("image", n_subjects=8, seed=4, prefix="scan-")
    claims = _dataset(admin, "claims", make_csv(n_subjects=60, seed=2, subject_prefix="claim"))
    r = admin.post(
        "/v1/datasets",
        files={"file": ("scans.zip", io.BytesIO(gen.zip_bytes(scans, "image")), "application/zip")},
        data={"spec": json.dumps(gen.spec("scans", "image"))},
    )
    assert r.status_code == 201, r.text
    s.media_dataset = str(r.json()["id"])
    s.models["visit-risk"] = _model(admin, "visit-risk", visits, approval=False)
    s.models["referral-triage"] = _model(admin, "referral-triage", referrals, approval=True)
    s.models["claims-triage"] = _model(admin, "claims-triage", claims, approval=True)
    for job_id in s.models.values():
        job = job_state(admin, job_id)
        assert job["status"] == "succeeded", job

    # The two completing requests are sent together (they may share one job: batching).
    done = [_request(portal, subject) for subject in ("visit-0003", "visit-0010")]
    s.to_approve = _request(portal, "referral-0004")
    s.in_review = _request(portal, "claim-0007")
    for rid in done:
        d = settle(portal, rid)
        assert d["status"] == "completed", d
    s.completed = done
    # A feature request on the same model: the report gets its flip-test chart.
    r = admin.post(
        "/v1/deletion-requests",
        json={"kind": "feature", "model": "visit-risk", "feature": "age", "reason": "not needed"},
    )
    assert r.status_code == 202, r.text
    s.feature_request = str(r.json()["id"])
    d = settle(admin, s.feature_request)
    assert d["status"] == "completed", d
    for rid in (s.to_approve, s.in_review):
        d = settle(portal, rid)
        assert d["status"] == "needs_review", d
    return s
