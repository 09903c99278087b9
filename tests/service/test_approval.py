"""A model that asks for approval is never promoted by the worker alone, however good the
candidate: the request waits in `needs_review` until an admin approves. The task bodies
run in-process, as the worker calls them; the API is real."""

from __future__ import annotations

from app.core.db import session_scope
from app.core.storage import get_store
from app.requests import lifecycle
from tests.support.app_env import AppEnv
from tests.support.factories import (
    auth,
    create_key,
    create_model,
    make_csv,
    plan_and_run,
    upload_dataset,
)


def test_require_approval_holds_a_passing_candidate(env: AppEnv) -> None:
    admin = create_key("admin")
    h = auth(admin)
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=40, rows_per_subject=3))
    create_model(
        env.client,
        admin,
        ds["id"],
        verification={"utility_max_drop": 1.0, "require_approval": True},
    )
    rid = env.client.post(
        "/v1/deletion-requests", headers=h, json={"kind": "subject", "subject_id": "subj-0001"}
    ).json()["id"]
    plan_and_run(env.client, admin, rid)
    req = env.client.get(f"/v1/deletion-requests/{rid}", headers=h).json()
    report = env.client.get(f"/v1/reports/{req['models'][0]['report_id']}", headers=h).json()
    assert report["passed"] and report["decision"] == "approval_required"
    # The membership scores kept for the dashboard include retained training members.
    samples = report["checks"]["forgetting"]["metrics"]["score_samples"]
    assert samples["retained"] and len(samples["retained"]) <= 200
    assert req["status"] == "needs_review"
    # The request's cost: its jobs summed, and what retraining everything would have cost.
    cost = req["cost"]
    assert cost["device_seconds"] > 0 and cost["retrain_estimate_seconds"] > 0
    assert cost["energy_joules"] is None  # no NVML on a CPU
    assert env.client.get("/v1/models/m", headers=h).json()["production_version"] == 1
    r = env.client.post(
        f"/v1/deletion-requests/{rid}/review", headers=h, json={"action": "approve"}
    )
    assert r.status_code == 200, r.text
    assert env.client.get("/v1/models/m", headers=h).json()["production_version"] == 2
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    assert env.client.get(f"/v1/deletion-requests/{rid}", headers=h).json()["status"] == "completed"
    cert = env.client.get(f"/v1/deletion-requests/{rid}/certificate", headers=h)
    assert cert.status_code == 200 and cert.json()["certificate"]["models"][0]["to_version"] == 2
