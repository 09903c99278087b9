"""A completed feature request is not undone by a rollback: promoting a version that
still reads the removed column is refused. Task bodies run in-process; the API is real."""

from __future__ import annotations

from app.core.db import session_scope
from app.core.storage import get_store
from app.requests import lifecycle
from tests.support.app_env import AppEnv
from tests.support.factories import (
    assert_error,
    auth,
    create_key,
    create_model,
    make_csv,
    plan_and_run,
    upload_dataset,
)


def test_rollback_to_a_version_using_a_removed_feature_is_refused(env: AppEnv) -> None:
    admin = create_key("admin")
    h = auth(admin)
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=60, rows_per_subject=3))
    create_model(
        env.client,
        admin,
        ds["id"],
        architecture={"kind": "logreg"},
        training={"epochs": 3, "batch_size": 32},
        unlearning={"mode": "monolithic"},
        verification={"utility_max_drop": 1.0, "reference_models": 0},
    )
    r = env.client.post(
        "/v1/deletion-requests",
        headers=h,
        json={"kind": "feature", "feature": "age", "model": "m", "reason": "not needed"},
    )
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    req = plan_and_run(env.client, admin, rid)
    if req["status"] == "needs_review":
        assert (
            env.client.post(
                f"/v1/deletion-requests/{rid}/review", headers=h, json={"action": "approve"}
            ).status_code
            == 200
        )
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    model = env.client.get("/v1/models/m", headers=h).json()
    assert model["production_version"] == 2, model
    assert [d["feature"] for d in model["config"]["removed_features"]] == ["age"]
    refused = env.client.post("/v1/models/m/versions/1/promote", headers=h)
    assert_error(refused, 409, "feature_removed")
    after = env.client.get("/v1/models/m", headers=h).json()
    assert after["production_version"] == 2
    assert [v["status"] for v in after["versions"]] == ["retired", "production"]
