"""The deadline watchdog announces each near or past deadline once; the API marks it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from app.core.db import session_scope
from app.models import AuditEvent, DeletionRequest
from app.models.base import utcnow
from app.models.webhooks import WebhookDelivery, WebhookEvent
from app.requests import deadlines
from app.webhooks import delivery
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, make_csv, upload_dataset


def _announcements(action: str) -> int:
    with session_scope() as s:
        return int(
            s.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action)
            )
            or 0
        )


def test_watchdog_announces_once_and_marks_overdue(env: AppEnv) -> None:
    admin = create_key("admin")
    upload_dataset(env.client, admin, "people", make_csv(n_subjects=10))
    ids = [
        env.client.post(
            "/v1/deletion-requests",
            headers=auth(admin),
            json={"kind": "subject", "subject_id": f"subj-000{i}"},
        ).json()["id"]
        for i in range(3)
    ]
    hook = env.client.post(
        "/v1/webhooks",
        headers=auth(admin),
        json={"url": "http://127.0.0.1:9/hook", "events": ["request.overdue"]},
    )
    assert hook.status_code == 201, hook.text
    now = utcnow()
    with session_scope() as s:  # one overdue, one due tomorrow, one far away
        for rid, delta in zip(
            ids, (timedelta(hours=-2), timedelta(days=1), timedelta(days=20)), strict=True
        ):
            req = s.get(DeletionRequest, rid)
            assert req is not None
            req.due_at = now + delta
    for _ in range(2):  # a second sweep announces nothing new
        with session_scope() as s:
            counts = deadlines.sweep(s, warn_days=3, now=now)
    assert counts == {"due_soon": 0, "overdue": 0}
    assert _announcements("request.overdue") == 1 and _announcements("request.due_soon") == 1
    # Subscribers are told, once: each announcement is one outbox event, whose fan-out
    # (the worker's) reaches only the endpoint subscribed to it.
    with session_scope() as s:
        event_ids = s.scalars(select(WebhookEvent.id)).all()
    for event_id in event_ids:
        delivery.fan_out(event_id)
    with session_scope() as s:
        events = s.scalars(select(WebhookDelivery.payload)).all()
    assert [e["type"] for e in events] == ["request.overdue"]
    assert events[0]["data"]["request_id"] == ids[0]
    views = [env.client.get(f"/v1/deletion-requests/{r}", headers=auth(admin)).json() for r in ids]
    assert [v["overdue"] for v in views] == [True, False, False]
    # Closing a request ends its deadline: cancelled requests are never overdue.
    env.client.post(f"/v1/deletion-requests/{ids[0]}/cancel", headers=auth(admin))
    assert (
        env.client.get(f"/v1/deletion-requests/{ids[0]}", headers=auth(admin)).json()["overdue"]
        is False
    )
