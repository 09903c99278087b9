"""Mitigations: each one runs as a retrain whose candidate is verified like any other
before it can serve; the review page shows the candidates side by side; the admin
chooses. The model asks for approval, so every candidate, however good, waits for a
person: nothing is promoted unverified or unasked."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.db import session_scope
from app.models import Job, ModelVersion, Report
from app.pipeline import training, unlearning
from app.requests import lifecycle
from app.requests.lifecycle import EVENTS
from tests.dashboard.helpers import login
from tests.support.app_env import AppEnv
from tests.support.factories import auth, make_csv, run_mitigation, upload_dataset


@pytest.fixture(scope="module")
def model(env: AppEnv, keys: dict[str, str]) -> str:
    ds = upload_dataset(env.client, keys["admin"], "people", make_csv(n_subjects=40))
    r = env.client.post(
        "/v1/models",
        headers=auth(keys["admin"]),
        json={
            "name": "mit",
            "dataset_id": ds["id"],
            "training": {"epochs": 2, "batch_size": 32},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
            "group_columns": ["colour"],
            "verification": {
                "utility_max_drop": 1.0,
                "require_approval": True,
                "min_group_size": 5,
            },
        },
    )
    assert r.status_code == 202, r.text
    training.run_training(r.json()["job_id"])
    return "mit"


@pytest.fixture(scope="module")
def admin(env: AppEnv, keys: dict[str, str]) -> TestClient:
    return login(env, keys["admin"])


def _view(env: AppEnv, keys: dict[str, str], rid: str) -> dict[str, Any]:
    return dict(env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(keys["admin"])).json())


def test_each_mitigation_is_verified_before_it_can_be_promoted(
    env: AppEnv, keys: dict[str, str], model: str, admin: TestClient
) -> None:
    h = auth(keys["admin"])
    rid = env.client.post(
        "/v1/deletion-requests", headers=h, json={"kind": "subject", "subject_id": "subj-0003"}
    ).json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    unlearning.run_unlearning(_view(env, keys, rid)["models"][0]["job_id"], EVENTS)
    assert _view(env, keys, rid)["status"] == "needs_review"
    # Only a known mitigation.
    r = env.client.post(
        f"/v1/deletion-requests/{rid}/review",
        headers=h,
        json={"action": "mitigate", "mitigation": "magic"},
    )
    assert r.status_code == 422, r.text
    # Approving a mitigation that has not run yet: nothing to promote.
    r = env.client.post(
        f"/v1/deletion-requests/{rid}/review",
        headers=h,
        json={"action": "approve", "mitigation": "group_dro"},
    )
    assert r.status_code == 409, r.text
    made: dict[str, int] = {}
    production = env.client.get(f"/v1/models/{model}", headers=h).json()["production_version"]
    for kind in ("reweight", "group_dro", "thresholds"):
        job_id = run_mitigation(env.client, h, rid, kind)
        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job is not None
            mit = job.result["unlearning"]["mitigation"]
            report = s.get(Report, job.report_id)
            assert report is not None
            version = s.scalars(
                select(ModelVersion).where(
                    ModelVersion.model_id == report.model_id,
                    ModelVersion.version == report.candidate_version,
                )
            ).one()
            checks = dict(report.checks)
            decision, status = report.decision, version.status
        assert mit["kind"] == kind
        made[kind] = version.version
        if kind == "group_dro":
            assert set(mit["group_losses"]["colour"]) == {"red", "green", "blue"}
        if kind == "thresholds":
            assert mit["thresholds"]["column"] == "colour"
        # Verified like any candidate (lineage, utility, fairness, forgetting), and held.
        assert {"lineage", "utility", "fairness", "forgetting"} <= set(checks)
        assert all(c["status"] in ("pass", "fail", "inconclusive") for c in checks.values())
        assert decision == "approval_required" and status == "candidate"
        assert _view(env, keys, rid)["status"] == "needs_review"
        prod = env.client.get(f"/v1/models/{model}", headers=h).json()["production_version"]
        assert prod == production  # nothing served before a person chose
    page = admin.get(f"/admin/requests/{rid}").text
    assert 'data-testid="candidates"' in page
    for kind in ("reweight", "group_dro", "thresholds"):
        assert f"mitigation: {kind}" in page
    # The admin picks one by name (thresholds): it is promoted, the others will not serve.
    r = env.client.post(
        f"/v1/deletion-requests/{rid}/review",
        headers=h,
        json={"action": "approve", "mitigation": "thresholds"},
    )
    assert r.status_code == 200, r.text
    prod = env.client.get(f"/v1/models/{model}", headers=h).json()["production_version"]
    assert prod == made["thresholds"]
    with session_scope() as s:
        statuses = {
            v.version: v.status
            for v in s.scalars(select(ModelVersion).where(ModelVersion.version.in_(made.values())))
        }
    assert statuses == {
        made["reweight"]: "rejected",
        made["group_dro"]: "rejected",
        made["thresholds"]: "production",
    }
    # The promoted version decides with its thresholds when it predicts.
    table = mit["thresholds"]["thresholds"]
    records = [
        {"age": a, "score": sc, "colour": c, "region": 2}
        for a in (20, 50, 80)
        for sc in (-1.0, 0.0, 1.0)
        for c in ("red", "green", "blue")
    ]
    pred = env.client.post(f"/v1/models/{model}/predict", headers=h, json={"records": records})
    assert pred.status_code == 200, pred.text
    for rec, p in zip(records, pred.json()["predictions"], strict=True):
        cut = table.get(rec["colour"], 0.5)
        assert p["label"] == ("yes" if p["score"] >= cut else "no"), (rec, p, cut)
