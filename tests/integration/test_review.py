"""A request that verification stops goes to `needs_review`, and an admin settles it.

The CV-screening data's historical labels rewarded a driving licence, so once the model
ignores the licence its accuracy against those labels must drop past the default gate:
a natural way into review, with nothing forced.
"""

from __future__ import annotations

import io
import json
from typing import Any

import httpx

from app.demo import cv_dataset
from app.stack import LocalStack
from tests.integration.flows import TERMINAL, train, wait_for


def _client(stack: LocalStack, role: str) -> httpx.Client:
    key = stack.create_key(role, role)
    return httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def _settled(client: httpx.Client, rid: str) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: client.get(f"/v1/deletion-requests/{rid}").json(),
            lambda d: d["status"] in TERMINAL,
        )
    )


def _model(admin: httpx.Client, name: str) -> None:
    spec = {
        "name": f"cv-{name}",
        "subject_column": "candidate",
        "label_column": "hired",
        "source_column": "agency",
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("cv.csv", io.BytesIO(cv_dataset(n=1200)), "text/csv")},
        data={"spec": json.dumps(spec)},
    )
    assert r.status_code == 201, r.text
    train(
        admin,
        {
            "name": name,
            "dataset_id": r.json()["id"],
            "architecture": {"kind": "logreg"},
            "training": {"epochs": 15, "batch_size": 64, "lr": 0.05, "seed": 2},
            "unlearning": {"mode": "monolithic"},
            "feature_columns": ["years_experience", "skills_score", "education", "driving_licence"],
        },
    )


def test_review_approve_and_reject(stack: LocalStack) -> None:
    admin, portal = _client(stack, "admin"), _client(stack, "portal")
    _model(admin, "ranker")
    body = {"kind": "feature", "model": "ranker", "feature": "driving_licence"}
    rid = admin.post("/v1/deletion-requests", json=body).json()["id"]
    stopped = _settled(admin, rid)
    assert stopped["status"] == "needs_review", stopped
    (m,) = stopped["models"]
    report = admin.get(f"/v1/reports/{m['report_id']}").json()
    assert report["decision"] == "needs_review" and not report["checks"]["utility"]["passed"]
    assert report["checks"]["feature"]["passed"]  # the licence is gone; only accuracy fell
    assert admin.get("/v1/models/ranker").json()["production_version"] == 1
    # Only admins review, and only requests in review.
    assert (
        portal.post(f"/v1/deletion-requests/{rid}/review", json={"action": "approve"}).status_code
        == 403
    )
    r = admin.post(
        f"/v1/deletion-requests/{rid}/review", json={"action": "approve", "note": "bias"}
    )
    assert r.status_code == 200, r.text
    done = _settled(admin, rid)
    assert done["status"] == "completed", done
    model = admin.get("/v1/models/ranker").json()
    assert model["production_version"] == m["to_version"]
    assert [f["feature"] for f in model["config"]["removed_features"]] == ["driving_licence"]
    again = admin.post(f"/v1/deletion-requests/{rid}/review", json={"action": "approve"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_in_review"

    # Reject: the candidate is refused and a retrain job replaces it.
    _model(admin, "ranker2")
    body = {"kind": "feature", "model": "ranker2", "feature": "driving_licence"}
    rid2 = admin.post("/v1/deletion-requests", json=body).json()["id"]
    assert _settled(admin, rid2)["status"] == "needs_review"
    r = admin.post(f"/v1/deletion-requests/{rid2}/review", json={"action": "reject"})
    assert r.status_code == 200, r.text
    after = admin.get(f"/v1/deletion-requests/{rid2}").json()
    assert after["status"] == "retraining"
    job_id = after["models"][0]["job_id"]
    job = wait_for(
        lambda: admin.get(f"/v1/jobs/{job_id}").json(),
        lambda j: j["status"] in ("succeeded", "failed"),
    )
    assert job["kind"] == "retrain" and job["status"] == "succeeded", job
    audit = admin.get("/v1/audit?limit=200").json()["items"]
    assert {"request.reviewed"} <= {e["action"] for e in audit}
