"""A legal duty is never blocked by a setting: an approximate method that errors falls
back to exact retraining, and an admin can retry a request whose job failed for good."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import get_store
from app.models import AuditEvent, Job, MLModel
from app.pipeline import retraining
from app.pipeline.conclude import fail_job
from app.requests import lifecycle
from app.requests.lifecycle import EVENTS
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


def _monolithic(env: AppEnv, admin: str) -> None:
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=40, rows_per_subject=3))
    create_model(
        env.client,
        admin,
        ds["id"],
        training={"epochs": 3, "batch_size": 32},
        unlearning={"mode": "monolithic", "strategy": "finetune"},
        verification={"utility_max_drop": 1.0, "reference_models": 0},
    )


def _request(env: AppEnv, admin: str, subject: str) -> str:
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": subject},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _finish(env: AppEnv, admin: str, rid: str) -> dict[str, Any]:
    """Run the pending retrain job and erase, as the worker would."""
    with session_scope() as s:
        job_id = s.scalars(
            select(Job.id).where(Job.kind == "retrain", Job.status == "pending")
        ).one()
    retraining.run_retrain(job_id, EVENTS)
    view: dict[str, Any] = env.client.get(
        f"/v1/deletion-requests/{rid}", headers=auth(admin)
    ).json()
    if view["status"] == "erasing":
        with session_scope() as s:
            lifecycle.erase(s, get_store(), rid)
        view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    return view


def test_a_failing_approximate_method_falls_back_to_exact_retraining(env: AppEnv) -> None:
    admin = create_key("admin")
    _monolithic(env, admin)
    # A setting stored before parameters were checked: the strategy cannot run with it.
    with session_scope() as s:
        model = s.scalars(select(MLModel)).one()
        u = dict(model.config["unlearning"]) | {"strategy_params": {"lr": -5.0}}
        model.config = {**model.config, "unlearning": u}
    rid = _request(env, admin, "subj-0004")
    view = plan_and_run(env.client, admin, rid)
    assert view["status"] == "retraining", view
    first = env.client.get(f"/v1/jobs/{view['models'][0]['job_id']}", headers=auth(admin))
    with session_scope() as s:
        fell = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.fell_back")).one()
        assert "finetune failed" in fell.data["error"]
        unlearn = s.scalars(select(Job).where(Job.kind == "unlearn")).one()
        assert unlearn.status == "succeeded" and unlearn.result["decision"] == "retrain"
        assert unlearn.result["method_error"].startswith("finetune failed")
    assert first.status_code == 200
    done = _finish(env, admin, rid)
    assert done["status"] == "completed", done
    assert done["models"][0]["method"] == "retrain" and done["models"][0]["status"] == "promoted"


def test_an_admin_retries_a_failed_request(env: AppEnv) -> None:
    admin, portal = create_key("admin"), create_key("portal")
    _monolithic(env, admin)
    rid = _request(env, admin, "subj-0005")
    with session_scope() as s:
        lifecycle.plan(s, rid)
    job_id = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()["models"][
        0
    ]["job_id"]
    # The job failed for good after its retries (as the worker records it).
    fail_job(job_id, "RuntimeError: the device fell off the bus", EVENTS)
    failed = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    assert failed["status"] == "failed" and "fell off the bus" in failed["error"]
    # Only admins retry, and only failed requests.
    assert_error(env.client.post(f"/v1/deletion-requests/{rid}/retry", headers=auth(portal)), 403)
    r = env.client.post(f"/v1/deletion-requests/{rid}/retry", headers=auth(admin))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "retraining" and r.json()["error"] is None
    assert_error(
        env.client.post(f"/v1/deletion-requests/{rid}/retry", headers=auth(admin)),
        409,
        "not_failed",
    )
    done = _finish(env, admin, rid)
    assert done["status"] == "completed", done
    with session_scope() as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "request.retried")).one()
