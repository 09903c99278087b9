"""Planning many requests at once (`palimpsest.plan_requests`, `lifecycle.plan_many`)
decides for each request exactly what planning it alone would: the same statuses, audit
trail, quarantined records, model rows, jobs and batching, tasks and webhook events. It
skips requests no longer `received`, and a request that fails costs the others nothing.
Task bodies run in-process, as the worker calls them; the API is real."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from app.audit import service as audit
from app.core import outbox
from app.core.db import session_scope
from app.models import AuditEvent, DeletionRequest, Job, MLModel, Record, RequestModel
from app.models.base import utcnow
from app.models.webhooks import WebhookEvent
from app.requests import lifecycle
from tests.support.app_env import AppEnv, app_env
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset
from tests.support.outbox import Capture, capture_tasks


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Capture]:
    yield capture_tasks(monkeypatch)


def _world(env: AppEnv) -> dict[str, str]:
    """A trained SISA model on one dataset, a second dataset no model reads."""
    admin, portal = create_key("admin"), create_key("portal")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=12, rows_per_subject=2))
    create_model(
        env.client,
        admin,
        ds["id"],
        training={"epochs": 1, "batch_size": 32},
        unlearning={"mode": "sisa", "shards": 2, "slices": 1},
    )
    other = make_csv(n_subjects=6, rows_per_subject=1, subject_prefix="other")
    upload_dataset(env.client, admin, "others", other)
    return {"admin": admin, "portal": portal, "dataset": ds["id"]}


def _post(env: AppEnv, key: str, body: dict[str, Any]) -> str:
    r = env.client.post("/v1/deletion-requests", headers=auth(key), json=body)
    assert r.status_code == 202, r.text
    rid: str = r.json()["id"]
    return rid


def _mix(env: AppEnv, world: dict[str, str]) -> list[str]:
    """Every kind of request, some covering the same records (the first one in the
    order quarantines them)."""
    with session_scope() as s:
        first_two = list(
            s.scalars(
                select(Record.external_id)
                .where(Record.dataset_id == world["dataset"])
                .order_by(Record.id)
                .limit(2)
            )
        )
    portal, admin = world["portal"], world["admin"]
    bodies: list[tuple[str, dict[str, Any]]] = [
        (portal, {"kind": "subject", "subject_id": "subj-0001"}),
        (portal, {"kind": "subject", "subject_id": "subj-0001"}),  # the same records
        (
            portal,
            {"kind": "records", "record_ids": first_two, "dataset_id": world["dataset"]},
        ),  # subj-0000's rows
        (portal, {"kind": "subject", "subject_id": "subj-0000"}),  # after the records one
        (portal, {"kind": "subject", "subject_id": "nobody-we-hold"}),
        (portal, {"kind": "subject", "subject_id": "other-0002"}),  # no model reads it
        (portal, {"kind": "source", "source": "registry"}),  # both datasets
        (admin, {"kind": "feature", "feature": "age", "model": "m"}),
        (portal, {"kind": "subject", "subject_id": "subj-0004"}),
    ]
    return [_post(env, key, body) for key, body in bodies]


def _outcome(ids: list[str], sent: list[outbox.PendingTask]) -> dict[str, Any]:
    """What planning decided, with ids replaced by their position (request ids by the
    order given, job ids by creation order)."""
    with session_scope() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.created_at, Job.id)))
        job_no = {j.id: n for n, j in enumerate(jobs)}
        names = {m.id: m.name for m in s.scalars(select(MLModel))}
        per_request = []
        for rid in ids:
            req = s.get(DeletionRequest, rid)
            assert req is not None
            trail = [
                (e.action, e.actor, e.data.get("from"), e.data.get("to"), e.data.get("records"))
                for e in s.scalars(
                    select(AuditEvent).where(AuditEvent.entity_id == rid).order_by(AuditEvent.id)
                )
            ]
            quarantined = sorted(
                s.scalars(select(Record.external_id).where(Record.quarantined_by == rid))
            )
            models = [
                (
                    names[rm.model_id],
                    rm.status,
                    job_no.get(rm.job_id or ""),
                    rm.from_version,
                    rm.to_version,
                    rm.method,
                )
                for rm in s.scalars(
                    select(RequestModel)
                    .where(RequestModel.request_id == rid)
                    .order_by(RequestModel.id)
                )
            ]
            per_request.append((req.status, req.n_records, req.error, trail, quarantined, models))
        return {
            "requests": per_request,
            "jobs": [(j.kind, j.method, j.status, j.not_before is not None) for j in jobs],
            "job_audit": Counter(
                (e.action, e.data.get("reason"), e.data.get("requests"))
                for e in s.scalars(select(AuditEvent).where(AuditEvent.entity_type == "job"))
            ),
            "webhook_events": Counter(s.scalars(select(WebhookEvent.event_type))),
            # Tasks sent, fan-outs aside (one per event alone, one per commit batched).
            "tasks": Counter(
                (t.name, t.queue, t.countdown) for t in sent if "fan_out_webhook" not in t.name
            ),
            "chain_intact": audit.verify_chain(s).intact,
        }


def _together(caplog: pytest.LogCaptureFixture) -> bool:
    """No batch fell back to planning its requests one by one."""
    return not [r for r in caplog.records if "together failed" in r.getMessage()]


def test_a_batch_is_planned_as_each_request_alone(
    tmp_path: Path, sent: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = []
    for side in ("alone", "batched"):
        with app_env(tmp_path / side) as env:
            ids = _mix(env, _world(env))
            sent.sent.clear()
            if side == "alone":
                for rid in ids:
                    lifecycle.plan_in_steps(rid)
            else:
                assert lifecycle.plan_many(ids) == []
                assert _together(caplog)
            outcomes.append(_outcome(ids, sent.sent))
    alone, batched = outcomes
    assert batched == alone
    statuses = [r[0] for r in alone["requests"]]
    # Model rows: (model, status, job by creation order, from, to, method); job 0 is
    # the training, 1 the batch the record requests joined, 2 the feature request's.
    joined = [("m", "planned", 1, 1, None, None)]
    untrained = [("m", "not_trained", None, 1, 1, "none")]
    assert [(st, r[1], r[5]) for st, r in zip(statuses, alone["requests"], strict=True)] == [
        ("planned", 2, joined),
        ("planned", 2, joined),
        ("erasing", 2, untrained),  # its rows are in the model's test split only
        ("erasing", 2, untrained),
        ("erasing", 0, []),
        ("erasing", 1, []),
        ("planned", 10, joined),
        ("planned", 0, [("m", "planned", 2, 1, None, None)]),
        ("planned", 2, joined),
    ]
    # The duplicate quarantined nothing (its twin did), nor did the subject request
    # whose rows the records request took first; both still cover those records.
    (_, n1, _, _, q1, _), (_, n2, _, _, q2, _) = alone["requests"][:2]
    assert n1 == n2 == 2 and len(q1) == 2 and q2 == []
    assert len(alone["requests"][2][4]) == 2 and alone["requests"][3][4] == []
    assert alone["chain_intact"]


def test_requests_no_longer_received_are_skipped(
    env: AppEnv, sent: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    world = _world(env)
    portal = world["portal"]
    done, cancelled, fresh = (
        _post(env, portal, {"kind": "subject", "subject_id": f"subj-000{i}"}) for i in (5, 6, 7)
    )
    lifecycle.plan_in_steps(done)
    r = env.client.post(f"/v1/deletion-requests/{cancelled}/cancel", headers=auth(portal))
    assert r.status_code == 200, r.text
    with session_scope() as s:
        before = {rid: s.get(DeletionRequest, rid) for rid in (done, cancelled)}
        trail = {
            rid: len(s.scalars(select(AuditEvent).where(AuditEvent.entity_id == rid)).all())
            for rid in (done, cancelled, fresh)
        }
        states = {rid: req.status for rid, req in before.items() if req is not None}
    assert lifecycle.plan_many([done, cancelled, fresh, "no-such-request"]) == []
    assert lifecycle.plan_many([fresh]) == []  # a redelivery: nothing more
    assert _together(caplog)
    with session_scope() as s:
        for rid in (done, cancelled):
            req = s.get(DeletionRequest, rid)
            assert req is not None and req.status == states[rid]
            n = len(s.scalars(select(AuditEvent).where(AuditEvent.entity_id == rid)).all())
            assert n == trail[rid]
        req = s.get(DeletionRequest, fresh)
        assert req is not None and req.status == "planned"
        # received -> planned, once.
        n = len(s.scalars(select(AuditEvent).where(AuditEvent.entity_id == fresh)).all())
        assert n == trail[fresh] + 1
        assert s.scalars(select(Record.id).where(Record.quarantined_by == cancelled)).all() == []


def test_a_failing_request_costs_the_others_nothing(env: AppEnv, sent: Capture) -> None:
    """One request cannot be planned (its model row already exists, so attaching it
    breaks a unique constraint): the batch is planned without it, and it goes back to
    its own `palimpsest.plan_request` task in 2 s, still `received`."""
    from workers import tasks

    world = _world(env)
    portal = world["portal"]
    ids = [_post(env, portal, {"kind": "subject", "subject_id": f"subj-000{i}"}) for i in (1, 2, 3)]
    bad = ids[1]
    with session_scope() as s:
        model = s.scalars(select(MLModel)).one()
        s.add(RequestModel(request_id=bad, model_id=model.id, status="planned"))
    sent.sent.clear()
    assert tasks.plan_requests.run(ids) == 1
    with session_scope() as s:
        status = {rid: s.get(DeletionRequest, rid).status for rid in ids}  # type: ignore[union-attr]
        assert status == {ids[0]: "planned", bad: "received", ids[2]: "planned"}
        assert s.scalars(select(Record.id).where(Record.quarantined_by == bad)).all() == []
        assert audit.verify_chain(s).intact
    retries = [(t.name, t.args, t.countdown) for t in sent.sent if "plan_request" in t.name]
    assert retries == [("palimpsest.plan_request", (bad,), 2.0)]


def test_a_request_waits_for_a_model_still_training(
    env: AppEnv, sent: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    world = _world(env)
    rid = _post(env, world["portal"], {"kind": "subject", "subject_id": "subj-0008"})
    elsewhere = _post(env, world["portal"], {"kind": "subject", "subject_id": "other-0001"})
    with session_scope() as s:
        s.execute(update(MLModel).values(status="training"))
    sent.sent.clear()
    assert lifecycle.plan_many([rid, elsewhere]) == []
    assert _together(caplog)
    with session_scope() as s:
        assert s.get(DeletionRequest, rid).status == "received"  # type: ignore[union-attr]
        assert s.get(DeletionRequest, elsewhere).status == "erasing"  # type: ignore[union-attr]
    assert [(t.name, t.args, t.countdown) for t in sent.sent if "plan" in t.name] == [
        ("palimpsest.plan_request", (rid,), 2.0)
    ]


def test_the_resume_sweep_sends_stuck_requests_as_one_batch(env: AppEnv, sent: Capture) -> None:
    from datetime import timedelta

    from app.jobs import recovery
    from workers import tasks

    world = _world(env)
    ids = [
        _post(env, world["portal"], {"kind": "subject", "subject_id": f"subj-001{i}"})
        for i in range(2)
    ]
    with session_scope() as s:
        s.execute(
            update(DeletionRequest)
            .where(DeletionRequest.id.in_(ids))
            .values(received_at=utcnow() - timedelta(hours=1))
        )
    sent.sent.clear()  # the plan tasks were lost with the broker
    with session_scope() as s:
        assert recovery.resume(s, older_than_seconds=60)["requests"] == 2
    batch = [t for t in sent.sent if "plan" in t.name]
    assert [(t.name, sorted(t.args[0])) for t in batch] == [
        ("palimpsest.plan_requests", sorted(ids))
    ]
    assert tasks.plan_requests.run(*batch[0].args) == 0
    with session_scope() as s:
        left = {s.get(DeletionRequest, r).status for r in ids}  # type: ignore[union-attr]
        assert left and left <= {"planned", "erasing"}
