"""Strategy "auto" on a monolithic network: a validation search against the reference
models picks the strategy and its parameters within its budget; the choice, the search
and its cost are in the job's result, and the next job on the same trained state reuses
the choice instead of searching again."""

from __future__ import annotations

from app.ml.autotune import CANDIDATES
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset


def _erase(env: AppEnv, admin: str, subject: str) -> dict:  # type: ignore[type-arg]
    from tests.support.factories import plan_and_run

    rid = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": subject},
    ).json()["id"]
    view = plan_and_run(env.client, admin, rid)
    job = env.client.get(f"/v1/jobs/{view['models'][0]['job_id']}", headers=auth(admin)).json()
    return dict(job)


def test_auto_searches_within_budget_records_the_choice_and_reuses_it(env: AppEnv) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=60, rows_per_subject=3))
    bad = env.client.post(
        "/v1/models",
        headers=auth(admin),
        json={
            "name": "bad",
            "dataset_id": ds["id"],
            "unlearning": {"mode": "monolithic", "strategy": "auto", "strategy_params": {"lr": 1}},
        },
    )
    assert bad.status_code == 422, bad.text
    create_model(
        env.client,
        admin,
        ds["id"],
        architecture={"kind": "mlp", "hidden": [16]},
        unlearning={"mode": "monolithic", "strategy": "auto"},
        # Single subjects give the attack no power: the owner accepts that for this model.
        verification={
            "reference_models": 2,
            "utility_max_drop": 1.0,
            "accept_inconclusive_forgetting": True,
        },
    )
    first = _erase(env, admin, "subj-0001")
    assert first["status"] == "succeeded", first
    un = first["result"]["unlearning"]
    auto = un["auto"]
    assert auto["reused"] is False and auto["search"]
    known = {(name, tuple(sorted(p.items()))) for name, p in CANDIDATES}
    for row in auto["search"]:
        assert (row["strategy"], tuple(sorted(row["params"].items()))) in known
        assert {"forget_accuracy", "retain_accuracy", "test_accuracy", "distance"} <= set(row)
    best = min(auto["search"], key=lambda r: r["distance"])
    assert (auto["strategy"], auto["params"]) == (best["strategy"], best["params"])
    assert un["method"] == auto["strategy"] == un["strategy"]["strategy"]
    assert auto["search_seconds"] > 0
    if auto["budget_seconds"] is not None:
        assert auto["budget_seconds"] > 0
        # Candidates after the first start only while the budget lasts.
        spent = 0.0
        for row in auto["search"][:-1]:
            spent += row["seconds"]
        assert len(auto["search"]) == 1 or spent <= auto["budget_seconds"]
    second = _erase(env, admin, "subj-0002")
    assert second["status"] == "succeeded", second
    again = second["result"]["unlearning"]["auto"]
    assert again["reused"] is True
    assert (again["strategy"], again["params"]) == (auto["strategy"], auto["params"])
