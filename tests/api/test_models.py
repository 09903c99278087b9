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


def _mono(strategy: str | None, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"mode": "monolithic", "strategy_params": params}
    if strategy is not None:
        body["strategy"] = strategy
    return body


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
        # Strategy parameters are checked per strategy when the model is created: found
        # only when an erasure runs, a bad one would fail every request on the model.
        ({"unlearning": _mono("neggrad_plus", lr=-5)}, 422, "invalid_config"),
        ({"unlearning": _mono("neggrad_plus", alpha=1.5)}, 422, "invalid_config"),
        ({"unlearning": _mono("finetune", batch_size=0)}, 422, "invalid_config"),
        ({"unlearning": _mono("finetune", epochs=2.5)}, 422, "invalid_config"),
        ({"unlearning": _mono("scrub", temperature=0)}, 422, "invalid_config"),
        ({"unlearning": _mono("scrub", retain_fraction="all")}, 422, "invalid_config"),
        ({"unlearning": _mono("scrub", lr=True)}, 422, "invalid_config"),
        ({"unlearning": _mono("scrub", momentum=0.9)}, 422, "invalid_config"),
        ({"unlearning": _mono(None, lr=-1)}, 422, "invalid_config"),
        ({"unlearning": _mono("sgd")}, 422, "unknown_strategy"),
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


def test_refusal_names_the_parameter(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    body = {"name": "neg-lr", "dataset_id": dataset["id"], "unlearning": _mono(None, lr=-5)}
    message = assert_error(post(env, keys["admin"], body), 422, "invalid_config")["message"]
    assert "lr must be > 0" in message, message


def test_patch_changes_how_later_jobs_unlearn(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    h = auth(keys["admin"])
    body = {
        "name": "mono-patch",
        "dataset_id": dataset["id"],
        "architecture": {"kind": "mlp", "hidden": [4]},
        "unlearning": _mono("finetune", epochs=1),
    }
    assert post(env, keys["admin"], body).status_code == 202
    url = "/v1/models/mono-patch"
    # Bad settings are refused and change nothing.
    for bad in (
        {"unlearning": {"strategy_params": {"lr": -5}}},
        {"unlearning": {"strategy": "scrub", "strategy_params": {"epochs": 1, "bogus": 1}}},
        {"unlearning": {"strategy": "nope"}},
        {"unlearning": {"shards": 8}},  # the trained versions' structure stays
        {"unlearning": {"mode": "sisa"}},
    ):
        assert_error(env.client.patch(url, headers=h, json=bad), 422)
    assert_error(env.client.patch(url, headers=auth(keys["auditor"]), json={"unlearning": {}}), 403)
    before = env.client.get(url, headers=h).json()["config"]
    nothing = env.client.patch(url, headers=h, json={})
    assert nothing.status_code == 200 and nothing.json()["config"] == before
    assert before["unlearning"]["strategy"] == "finetune"
    assert before["unlearning"]["strategy_params"] == {"epochs": 1}
    # A fix: another strategy with its own parameters; the rest of the block stays.
    r = env.client.patch(
        url,
        headers=h,
        json={"unlearning": {"strategy": "scrub", "strategy_params": {"lr": 0.001}}},
    )
    assert r.status_code == 200, r.text
    after = r.json()["config"]
    assert after["unlearning"] == {
        **before["unlearning"],
        "strategy": "scrub",
        "strategy_params": {"lr": 0.001},
    }
    assert after["batching"] == before["batching"]
    assert env.client.get(url, headers=h).json()["config"] == after
    # Back to the default strategy and its defaults.
    r = env.client.patch(
        url, headers=h, json={"unlearning": {"strategy": None, "strategy_params": None}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["config"]["unlearning"]["strategy"] is None
    assert r.json()["config"]["unlearning"]["strategy_params"] is None
