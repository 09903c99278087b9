"""Batching: planned requests on one model coalesce into a held job that is sent when its
window, maximum wait or a request's deadline says so. Task bodies run in-process, as the
worker calls them; the API is real."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from app.core.db import session_scope
from app.jobs import batching
from app.models import AuditEvent, DeletionRequest, Job
from app.models.base import utcnow
from app.pipeline import training, unlearning
from app.requests import lifecycle
from app.requests.lifecycle import EVENTS
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, make_csv, upload_dataset


def _model(env: AppEnv, admin: str, batching_policy: dict[str, Any] | None) -> None:
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=30, rows_per_subject=2))
    body: dict[str, Any] = {
        "name": "m",
        "dataset_id": ds["id"],
        "training": {"epochs": 1, "batch_size": 32},
        "unlearning": {"mode": "sisa", "shards": 2, "slices": 1},
    }
    if batching_policy is not None:
        body["batching"] = batching_policy
    r = env.client.post("/v1/models", headers=auth(admin), json=body)
    assert r.status_code == 202, r.text
    training.run_training(r.json()["job_id"])


def _request(env: AppEnv, key: str, subject: int) -> str:
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(key),
        json={"kind": "subject", "subject_id": f"subj-{subject:04d}"},
    )
    assert r.status_code == 202, r.text
    rid: str = r.json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    return rid


def _job_of(env: AppEnv, key: str, rid: str) -> dict[str, Any]:
    req = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(key)).json()
    job: dict[str, Any] = env.client.get(
        f"/v1/jobs/{req['models'][0]['job_id']}", headers=auth(key)
    ).json()
    return job


def _released(job_id: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        return [
            e.data
            for e in s.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == "job.released", AuditEvent.entity_id == job_id
                )
            )
        ]


def test_default_policy_sends_each_job_at_once(env: AppEnv) -> None:
    admin = create_key("admin")
    _model(env, admin, None)
    job = _job_of(env, admin, _request(env, admin, 1))
    assert job["status"] == "pending" and job["not_before"] is None
    # A second request joins the pending job: still one job.
    assert _job_of(env, admin, _request(env, admin, 2))["id"] == job["id"]


def test_window_and_minimum_batch_hold_the_job_until_due(env: AppEnv) -> None:
    admin = create_key("admin")
    _model(env, admin, {"window_seconds": 3600, "min_batch": 3, "max_wait_seconds": 86400})
    rids = [_request(env, admin, i) for i in (1, 2)]
    job = _job_of(env, admin, rids[0])
    assert job["request_ids"] == rids
    with session_scope() as s:
        first = s.get(DeletionRequest, rids[0])
        assert first is not None
        received = first.received_at
        held = s.get(Job, job["id"])
        assert held is not None and held.not_before is not None
        # Below the minimum batch: held for the maximum wait.
        assert abs((held.not_before - received) - timedelta(days=1)) < timedelta(seconds=1)
    rids.append(_request(env, admin, 3))
    with session_scope() as s:
        held = s.get(Job, job["id"])
        assert held is not None and held.not_before is not None
        # A full batch waits out the window only.
        assert abs((held.not_before - received) - timedelta(hours=1)) < timedelta(seconds=1)
    # A held job's task does nothing: the worker leaves it to the beat.
    unlearning.run_unlearning(job["id"], EVENTS)
    assert _job_of(env, admin, rids[0])["status"] == "pending"
    with session_scope() as s:
        assert batching.release_due(s, now=utcnow()) == {"released": 0, "held": 1}
    with session_scope() as s:
        assert batching.release_due(s, now=utcnow() + timedelta(hours=2)) == {
            "released": 1,
            "held": 0,
        }
    sent = _job_of(env, admin, rids[0])
    assert sent["not_before"] is None and sent["request_ids"] == rids
    assert [e["reason"] for e in _released(job["id"])] == ["window"]
    # Once sent, the job starts and takes all three requests into one unlearning (its
    # two shards fan out as a chord, which these in-process tests do not run).
    unlearning.run_unlearning(job["id"], EVENTS)
    assert _job_of(env, admin, rids[0])["status"] == "running"
    statuses = {
        env.client.get(f"/v1/deletion-requests/{r}", headers=auth(admin)).json()["status"]
        for r in rids
    }
    assert statuses == {"unlearning"}
    # A request arriving now goes into the next job, not the finished one.
    later = _job_of(env, admin, _request(env, admin, 4))
    assert later["id"] != job["id"] and later["status"] == "pending"
    assert later["request_ids"] == [later["request_ids"][0]] and later["not_before"] is not None


def test_maximum_wait_releases_a_batch_below_the_minimum(env: AppEnv) -> None:
    admin = create_key("admin")
    _model(env, admin, {"window_seconds": 60, "min_batch": 10, "max_wait_seconds": 600})
    rid = _request(env, admin, 1)
    job = _job_of(env, admin, rid)
    with session_scope() as s:
        assert batching.release_due(s, now=utcnow() + timedelta(seconds=120))["released"] == 0
    with session_scope() as s:
        assert batching.release_due(s, now=utcnow() + timedelta(seconds=601))["released"] == 1
    assert [e["reason"] for e in _released(job["id"])] == ["max_wait"]


def test_a_near_deadline_overrides_the_window(env: AppEnv) -> None:
    admin = create_key("admin")
    _model(
        env,
        admin,
        {"window_seconds": 86400, "max_wait_seconds": 86400, "deadline_margin_hours": 72},
    )
    first = _request(env, admin, 1)
    job = _job_of(env, admin, first)
    assert job["not_before"] is not None
    # A second request, due in two days (e.g. received long ago by the portal), joins
    # the batch and brings it forward: the job is sent now.
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": "subj-0002"},
    )
    rid = r.json()["id"]
    with session_scope() as s:
        req = s.get(DeletionRequest, rid)
        assert req is not None
        req.due_at = utcnow() + timedelta(days=2)
    with session_scope() as s:
        lifecycle.plan(s, rid)
    sent = _job_of(env, admin, first)
    assert sent["id"] == job["id"] and sent["not_before"] is None
    assert set(sent["request_ids"]) == {first, rid}
    assert [e["reason"] for e in _released(job["id"])] == ["deadline"]


def test_max_batch_one_gives_each_request_its_own_job(env: AppEnv) -> None:
    admin = create_key("admin")
    _model(env, admin, {"max_batch": 1})
    jobs = {_job_of(env, admin, _request(env, admin, i))["id"] for i in (1, 2, 3)}
    assert len(jobs) == 3


def test_patch_changes_the_policy_and_reschedules_held_jobs(env: AppEnv) -> None:
    admin, portal = create_key("admin"), create_key("portal")
    _model(env, admin, {"window_seconds": 3600, "max_wait_seconds": 3600})
    rid = _request(env, admin, 1)
    job = _job_of(env, admin, rid)
    assert job["not_before"] is not None
    # Bad input is refused and changes nothing.
    bad = env.client.patch(
        "/v1/models/m",
        headers=auth(admin),
        json={"batching": {"window_seconds": 100, "max_wait_seconds": 10}},
    )
    assert bad.status_code == 422
    assert env.client.patch(
        "/v1/models/m", headers=auth(portal), json={"batching": {}}
    ).status_code in (401, 403)
    unknown = env.client.patch("/v1/models/nope", headers=auth(admin), json={"batching": {}})
    assert unknown.status_code == 404
    assert _job_of(env, admin, rid)["not_before"] == job["not_before"]
    r = env.client.patch("/v1/models/m", headers=auth(admin), json={"batching": {}})
    assert r.status_code == 200, r.text
    assert r.json()["config"]["batching"]["window_seconds"] == 0
    # The held job's time has come under the new policy: sent at once.
    assert _job_of(env, admin, rid)["not_before"] is None
    assert [e["reason"] for e in _released(job["id"])] == ["window"]
