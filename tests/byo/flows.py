"""Request helpers for the bring-your-own-model service tests (in-process workers)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import get_store
from app.models import Job
from app.pipeline import retraining
from app.requests import lifecycle
from app.requests.lifecycle import EVENTS
from tests.support.factories import auth, plan_and_run


def erase_subject(client: Any, admin: str, subject: str) -> dict[str, Any]:
    """A subject's deletion request planned and run to its end, as the workers would:
    unlearning, a fallback retrain if one is queued, then erasure."""
    r = client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": subject},
    )
    assert r.status_code == 202, r.text
    rid = str(r.json()["id"])
    view = plan_and_run(client, admin, rid)
    if view["status"] == "retraining":
        with session_scope() as s:
            job_id = s.scalars(
                select(Job.id).where(Job.kind == "retrain", Job.status == "pending")
            ).one()
        retraining.run_retrain(job_id, EVENTS)
        view = client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    if view["status"] == "erasing":
        with session_scope() as s:
            lifecycle.erase(s, get_store(), rid)
        view = client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    return dict(view)
