"""`POST /v1/models` intake (training itself runs in workers, not here)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, make_csv, make_rows, upload_dataset


@pytest.fixture(scope="module")
def dataset(env: AppEnv, keys: dict[str, str]) -> dict[str, Any]:
    rows = make_rows(n_subjects=10, seed=21, subject_prefix="m")
    return upload_dataset(env.client, keys["admin"], "models-ds", make_csv(rows))


def post(env: AppEnv, key: str, body: Any) -> Any:
    return env.client.post("/v1/models", headers=auth(key), json=body)


def test_create_is_accepted_and_queued(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    resp = post(
        env,
        keys["admin"],
        {
            "name": "churn",
            "dataset_id": dataset["id"],
            "architecture": {"kind": "mlp", "hidden": [8]},
            "training": {"epochs": 1, "batch_size": 16, "lr": 0.05, "weight_decay": 0, "seed": 3},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2, "sharding": "subject"},
        },
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) >= {"id", "name", "status", "job_id"}
    assert body["name"] == "churn"
    view = env.client.get("/v1/models/churn", headers=auth(keys["auditor"]))
    assert view.status_code == 200
    got = view.json()
    assert got["id"] == body["id"] and got["production_version"] is None
    assert got["versions"] == []
    job = env.client.get(f"/v1/jobs/{body['job_id']}", headers=auth(keys["auditor"]))
    assert job.status_code == 200, job.text
    assert job.json()["status"] == "pending"
    assert_error(post(env, keys["admin"], {"name": "churn", "dataset_id": dataset["id"]}), 409)


@pytest.mark.parametrize(
    ("patch", "status", "code"),
    [
        ({"dataset_id": "no-such-dataset"}, 404, "dataset_not_found"),
        ({"architecture": {"kind": "transformer"}}, 422, None),
        ({"architecture": {"kind": "mlp", "hidden": []}}, 422, None),
        ({"architecture": {"kind": "mlp", "hidden": [0]}}, 422, None),
        ({"architecture": "mlp"}, 422, None),
        ({"feature_columns": ["no-such-column"]}, 422, "invalid_columns"),
        ({"group_columns": ["no-such-column"]}, 422, "invalid_columns"),
        ({"architecture": {"kind": "mlp"}, "unlearning": {"certified": True}}, 422, None),
        ({"training": {"epochs": 0}}, 422, None),
        ({"test_fraction": 1.5}, 422, None),
        ({"name": "bad name!"}, 422, None),
    ],
)
def test_refused_create(
    env: AppEnv,
    keys: dict[str, str],
    dataset: dict[str, Any],
    patch: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    body = {"name": "refused", "dataset_id": dataset["id"], **patch}
    assert_error(post(env, keys["admin"], body), status, code)
    assert_error(env.client.get("/v1/models/refused", headers=auth(keys["admin"])), 404)


def test_unknown_model_and_version(env: AppEnv, keys: dict[str, str]) -> None:
    h = auth(keys["admin"])
    assert_error(env.client.get("/v1/models/nope", headers=h), 404, "model_not_found")
    resp = env.client.post("/v1/models/nope/predict", headers=h, json={"records": [{"a": 1}]})
    assert_error(resp, 404)
    resp = env.client.post("/v1/models/nope/versions/abc/promote", headers=h)
    assert_error(resp, 422)


def test_a_new_model_stores_epochs_as_passes_per_record(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    """Its stored `training` names the schedule; a config without one is a model from
    before, whose SISA stages each train `epochs` epochs (app.ml.schedule)."""
    from app.core.db import session_scope
    from app.ml.config import TrainingConfig
    from app.ml.schedule import stage_epochs
    from app.models import MLModel

    resp = post(
        env,
        keys["admin"],
        {"name": "per-record", "dataset_id": dataset["id"], "training": {"epochs": 20}},
    )
    assert resp.status_code == 202, resp.text
    with session_scope() as s:
        model = s.get(MLModel, resp.json()["id"])
        assert model is not None
        stored = dict(model.config["training"])
    assert stored["schedule"] == "per_record"
    assert stage_epochs(TrainingConfig.from_dict(stored), 8) == (5, 4, 4, 4, 4, 4, 5, 5)
    del stored["schedule"]
    assert stage_epochs(TrainingConfig.from_dict(stored), 8) == (20,) * 8
