"""Tasks are idempotent: a redelivery (acks_late after a crash) changes nothing the second
time. The task bodies run here in-process, exactly as the worker calls them, against a
migrated database; the API that enqueued them is real."""

from __future__ import annotations

from sqlalchemy import func, select

from app.core.db import session_scope
from app.core.storage import get_store
from app.models import AuditEvent, ModelVersion, Record, RequestModel
from app.pipeline import training, unlearning
from app.requests import lifecycle
from app.requests.lifecycle import EVENTS
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, make_csv, upload_dataset


def _count(model: type, *where: object) -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_every_task_body_can_run_twice(env: AppEnv) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=40, rows_per_subject=3))
    r = env.client.post(
        "/v1/models",
        headers=auth(admin),
        json={
            "name": "m",
            "dataset_id": ds["id"],
            "training": {"epochs": 2, "batch_size": 32},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
            "verification": {"utility_max_drop": 1.0},
        },
    )
    train_job = r.json()["job_id"]
    training.run_training(train_job)
    training.run_training(train_job)
    assert _count(ModelVersion) == 1

    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": "subj-0003"},
    )
    rid = r.json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    with session_scope() as s:
        lifecycle.plan(s, rid)
    assert _count(RequestModel) == 1
    job_id = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()["models"][
        0
    ]["job_id"]
    unlearning.run_unlearning(job_id, EVENTS)
    events = _count(AuditEvent)
    unlearning.run_unlearning(job_id, EVENTS)
    assert _count(ModelVersion) == 2 and _count(AuditEvent) == events
    assert (
        env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()["status"]
        == "erasing"
    )
    for _ in range(2):
        with session_scope() as s:
            lifecycle.erase(s, get_store(), rid)
    done = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    assert done["status"] == "completed"
    assert _count(Record) == 40 * 3 - 3
    assert env.client.get("/v1/audit/verify", headers=auth(admin)).json()["intact"] is True
