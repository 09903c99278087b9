"""Every unlearning path on media models: approximate strategies for monolithic
networks, fallback retraining when one cannot run, and the group-reweighted
mitigation retrain; verification runs its usual checks on them."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.jobs import routing
from app.models import Job, MLModel
from app.pipeline import retraining
from app.requests.lifecycle import EVENTS
from tests.media import gen
from tests.media.test_flow import SMALL, finish
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_model, plan_and_run, post_dataset


def _model(env: AppEnv, admin: str, kind: str, name: str, unlearning: dict[str, Any]) -> str:
    recs = gen.rows(kind, n_subjects=16, seed=11, prefix=f"{name}-")
    resp = post_dataset(env.client, admin, gen.zip_bytes(recs, kind), gen.spec(name, kind), "d.zip")
    assert resp.status_code == 201, resp.text
    create_model(
        env.client,
        admin,
        resp.json()["id"],
        name=name,
        architecture={"kind": "mlp", "hidden": [8], "encoders": {"media": SMALL[kind]}},
        unlearning=unlearning,
        verification={"utility_max_drop": 1.0, "reference_models": 1, "fairness_max_drop": 1.0},
    )
    got = env.client.get(f"/v1/models/{name}", headers=auth(admin)).json()
    assert got["production_version"] == 1, got
    return name


def trained_subject(model_name: str, prefix: str) -> str:
    """A subject of `prefix` with a record in the model's training split."""
    from app.core.security import subject_key
    from app.core.settings import get_settings
    from app.models import Lineage, Record, Subject

    with session_scope() as s:
        model = s.scalars(select(MLModel).where(MLModel.name == model_name)).one()
        for i in range(2, 16):
            name = f"{prefix}s{i:03d}"
            key = subject_key(name, get_settings().pepper)
            hit = s.scalars(
                select(Lineage.id)
                .join(Record, Record.id == Lineage.record_id)
                .join(Subject, Subject.id == Record.subject_id)
                .where(
                    Subject.subject_key == key,
                    Lineage.model_id == model.id,
                    Lineage.split == "train",
                )
            ).first()
            if hit is not None:
                return name
    raise AssertionError("no trained subject")


def _erase(env: AppEnv, admin: str, subject: str) -> dict[str, Any]:
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": subject},
    )
    assert r.status_code == 202, r.text
    return plan_and_run(env.client, admin, r.json()["id"])


def _report(env: AppEnv, admin: str, view: dict[str, Any]) -> dict[str, Any]:
    rid = view["models"][0]["report_id"]
    out: dict[str, Any] = env.client.get(f"/v1/reports/{rid}", headers=auth(admin)).json()
    return out


@pytest.mark.parametrize("strategy", ["finetune", "neggrad_plus", "scrub"])
@pytest.mark.parametrize("kind", ["text", "audio"])
def test_monolithic_approximate_strategies(
    env: AppEnv, keys: dict[str, str], kind: str, strategy: str
) -> None:
    admin = keys["admin"]
    name = _model(
        env, admin, kind, f"mono-{kind}-{strategy}", {"mode": "monolithic", "strategy": strategy}
    )
    view = finish(env, admin, _erase(env, admin, trained_subject(name, f"{name}-")))
    (m,) = view["models"]
    assert m["method"] in (strategy, "retrain"), m
    report = _report(env, admin, view)
    assert {"utility", "forgetting", "fairness"} <= set(report["checks"]), report
    assert env.client.get(f"/v1/models/{name}", headers=auth(admin)).json()["versions"]


def test_a_failing_strategy_falls_back_to_exact_retraining(
    env: AppEnv, keys: dict[str, str]
) -> None:
    admin = keys["admin"]
    _model(
        env, admin, "image", "mono-image-fallback", {"mode": "monolithic", "strategy": "finetune"}
    )
    with session_scope() as s:
        model = s.scalars(select(MLModel).where(MLModel.name == "mono-image-fallback")).one()
        model_id = model.id
        u = dict(model.config["unlearning"]) | {"strategy_params": {"lr": -5.0}}
        model.config = {**model.config, "unlearning": u}
    view = _erase(env, admin, trained_subject("mono-image-fallback", "mono-image-fallback-"))
    assert view["status"] == "retraining", view
    with session_scope() as s:
        job_id = s.scalars(
            select(Job.id).where(
                Job.kind == "retrain", Job.status == "pending", Job.model_id == model_id
            )
        ).one()
    retraining.run_retrain(job_id, EVENTS)
    view = finish(
        env,
        admin,
        env.client.get(f"/v1/deletion-requests/{view['id']}", headers=auth(admin)).json(),
    )
    assert view["status"] == "completed", view
    assert view["models"][0]["method"] == "retrain"


def test_group_reweighted_mitigation_retrains_a_media_model(
    env: AppEnv, keys: dict[str, str]
) -> None:
    admin = keys["admin"]
    name = _model(
        env,
        admin,
        "audio",
        "sisa-audio-mitigated",
        {"mode": "sisa", "shards": 2, "slices": 2, "sharding": "source"},
    )
    with session_scope() as s:
        model = s.scalars(select(MLModel).where(MLModel.name == name)).one()
        job = routing.create_retrain(
            s, model.id, "mitigation", {"flagged": [{"column": "group", "group": "b"}]}
        )
        job_id = job.id
    retraining.run_retrain(job_id, EVENTS)
    got = env.client.get(f"/v1/jobs/{job_id}", headers=auth(admin)).json()
    assert got["status"] == "succeeded", got
    with session_scope() as s:
        result = s.get(Job, job_id).result  # type: ignore[union-attr]
    mitigation = result["unlearning"]["mitigation"]
    assert mitigation["reweighted"] is True, result
    assert result["method"] == "retrain" and result["version"] == 2, result
    assert {"utility", "fairness"} <= {
        k.removeprefix("verify.") for k in result["phases"]["seconds"]
    }
