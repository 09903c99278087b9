"""A user installs a plugin package, creates a model with it, erases a subject and sees a
new production version; a gbdt model does the same exactly. Creation refuses what
cannot work with a 4xx naming the kind and the error."""

from __future__ import annotations

from typing import Any

import pytest

from tests.byo.flows import erase_subject
from tests.support.app_env import AppEnv
from tests.support.factories import (
    assert_error,
    auth,
    create_key,
    create_model,
    make_csv,
    upload_dataset,
)


@pytest.fixture(scope="module")
def admin(env: AppEnv) -> str:
    return create_key("admin")


@pytest.fixture(scope="module")
def dataset(env: AppEnv, admin: str) -> dict[str, Any]:
    return upload_dataset(env.client, admin, "byo", make_csv(n_subjects=40, rows_per_subject=3))


# Tiny data: the checks are measured, but a one-record forget set is noise, so the
# margins are wide (the flows, not the check thresholds, are under test here).
LENIENT = {
    "utility_max_drop": 1.0,
    "forgetting_margin": 0.5,
    "reference_models": 2,
    # An approximate result on such data has no attack power to show: accepted, as a
    # model owner may (issue 13), so the approximate path is what runs.
    "accept_inconclusive_forgetting": True,
}


def _post(env: AppEnv, admin: str, body: dict[str, Any]) -> Any:
    return env.client.post("/v1/models", headers=auth(admin), json=body)


@pytest.mark.parametrize(
    ("arch", "unlearning", "code", "needle"),
    [
        ({"kind": "no-such-plugin"}, {}, "architecture_plugin", "no architecture plugin named"),
        ({"kind": "example-resmlp", "depth": 3}, {}, "architecture_plugin", "unknown parameters"),
        ({"kind": "example-resmlp"}, {"certified": True}, "invalid_config", "linear"),
        ({"kind": "mlp", "width": 3}, {}, None, "Extra inputs are not permitted"),
        ({"kind": "gbdt"}, {"slices": 3}, "slices_not_applicable", "slices do not apply"),
        ({"kind": "gbdt", "n_estimators": 3}, {}, "invalid_architecture", "unknown gbdt"),
        ({"kind": "random_forest", "max_depth": -2}, {}, "invalid_architecture", "max_depth"),
        (
            {"kind": "gbdt"},
            {"mode": "monolithic", "strategy": "finetune"},
            "strategy_not_applicable",
            "do not apply",
        ),
        ({"kind": "gbdt"}, {"certified": True}, "invalid_config", "certified"),
    ],
)
def test_what_cannot_work_is_refused_at_creation(
    env: AppEnv,
    admin: str,
    dataset: dict[str, Any],
    arch: dict[str, Any],
    unlearning: dict[str, Any],
    code: str | None,
    needle: str,
) -> None:
    body = {"name": "refused", "dataset_id": dataset["id"], "architecture": arch}
    if unlearning:
        body["unlearning"] = unlearning
    err = assert_error(_post(env, admin, body), 422, code)
    assert needle in err["message"], err
    if arch["kind"].startswith(("no-such", "example")):
        assert arch["kind"] in err["message"]


def _erase_and_check(env: AppEnv, admin: str, name: str, method: str) -> dict[str, Any]:
    before = env.client.get(f"/v1/models/{name}", headers=auth(admin)).json()
    assert before["production_version"] == 1, before
    view = erase_subject(env.client, admin, "subj-0007")
    assert view["status"] == "completed", view
    entry = next(m for m in view["models"] if m["model"] == name)
    assert entry["method"] == method and entry["to_version"] == 2, view
    after = env.client.get(f"/v1/models/{name}", headers=auth(admin)).json()
    assert after["production_version"] == 2
    pred = env.client.post(
        f"/v1/models/{name}/predict",
        headers=auth(admin),
        json={"records": [{"age": 40, "score": 0.3, "colour": "red", "region": 2}]},
    )
    assert pred.status_code == 200, pred.text
    assert pred.json()["version"] == 2
    return view


def _own_dataset(env: AppEnv, admin: str, name: str) -> str:
    """Each flow has a dataset of its own: an erasure reaches every model of a dataset."""
    ds = upload_dataset(env.client, admin, name, make_csv(n_subjects=40, rows_per_subject=3))
    return str(ds["id"])


def test_a_plugin_sisa_model_forgets_a_subject(env: AppEnv, admin: str) -> None:
    arch = {"kind": "example-resmlp", "width": 8, "blocks": 1}
    create_model(
        env.client, admin, _own_dataset(env, admin, "p1"), "plugin-sisa", architecture=arch
    )
    view = env.client.get("/v1/models/plugin-sisa", headers=auth(admin)).json()
    assert view["config"]["architecture"] == arch
    _erase_and_check(env, admin, "plugin-sisa", "sisa")


def test_a_plugin_monolithic_model_unlearns_approximately(env: AppEnv, admin: str) -> None:
    create_model(
        env.client,
        admin,
        _own_dataset(env, admin, "p2"),
        "plugin-mono",
        architecture={"kind": "example-bilinear", "rank": 4},
        unlearning={"mode": "monolithic", "strategy": "finetune"},
        verification=LENIENT,
    )
    view = _erase_and_check(env, admin, "plugin-mono", "finetune")
    assert view["models"][0]["report_id"]


def test_a_linear_plugin_gets_certified_removal(env: AppEnv, admin: str) -> None:
    create_model(
        env.client,
        admin,
        _own_dataset(env, admin, "p3"),
        "plugin-cert",
        architecture={"kind": "example-linear"},
        # A strong L2 term and noise scale: one removal fits the budget on tiny data.
        unlearning={"certified": True, "certified_lambda": 1.0, "certified_sigma": 50.0},
        verification=LENIENT,
    )
    _erase_and_check(env, admin, "plugin-cert", "certified")


def test_a_gbdt_sisa_model_forgets_a_subject_exactly(env: AppEnv, admin: str) -> None:
    create_model(
        env.client,
        admin,
        _own_dataset(env, admin, "t1"),
        "gbdt-sisa",
        architecture={"kind": "gbdt", "max_iter": 10},
        unlearning={"mode": "sisa", "shards": 2},
    )
    view = env.client.get("/v1/models/gbdt-sisa", headers=auth(admin)).json()
    assert view["config"]["unlearning"]["slices"] == 1
    _erase_and_check(env, admin, "gbdt-sisa", "sisa")


def test_a_monolithic_forest_falls_back_to_retraining(env: AppEnv, admin: str) -> None:
    create_model(
        env.client,
        admin,
        _own_dataset(env, admin, "t2"),
        "forest-mono",
        architecture={"kind": "random_forest", "n_estimators": 10},
        unlearning={"mode": "monolithic"},
        verification=LENIENT,
    )
    _erase_and_check(env, admin, "forest-mono", "retrain")
