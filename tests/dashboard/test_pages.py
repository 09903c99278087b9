"""The audit log with its chain status, and webhooks with their failed deliveries."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from app.audit.service import record
from app.core.db import get_engine, session_scope
from app.dashboard import pages
from app.models.base import utcnow
from app.webhooks.models import WebhookDelivery
from tests.dashboard.helpers import login
from tests.support.app_env import AppEnv, app_env
from tests.support.factories import auth, create_key


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[AppEnv]:
    with app_env(tmp_path) as e:
        yield e


def test_audit_pages_and_chain_status(fresh: AppEnv) -> None:
    for i in range(60):
        create_key("portal", f"portal-{i}")  # each key creation is an audit event
    with session_scope() as s:  # an event with long data, like model.settings_changed
        record(
            s,
            actor="cli",
            action="model.settings_changed",
            entity_type="model",
            entity_id="m1",
            data={"before": {"max_batch": 1, "window_seconds": 0.0}, "after": {"max_batch": 8}},
        )
    client = login(fresh, create_key("auditor"))
    page = client.get("/admin/audit")
    assert page.status_code == 200
    status = re.search(r'data-testid="chain-status"[^>]*>(.*?)</p>', page.text, re.S)
    assert status is not None and "verified" in status.group(1)
    ids = [int(i) for i in re.findall(r'<tr data-event-id="(\d+)"', page.text)]
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    nxt = re.search(r'href="/admin/audit\?cursor=(\d+)"', page.text)
    assert nxt is not None
    older = [
        int(i)
        for i in re.findall(
            r'<tr data-event-id="(\d+)"', client.get(f"/admin/audit?cursor={nxt.group(1)}").text
        )
    ]
    assert older and max(older) < min(ids)
    assert client.get("/admin/audit?cursor=abc").status_code == 400
    only = client.get("/admin/audit?action=dashboard.login").text
    assert re.findall(r"<td>(dashboard\.login|api_key\.created)</td>", only) == ["dashboard.login"]
    chips = page.text[page.text.index('data-testid="audit-actions"') :]
    assert re.search(r'action=api_key.created">api_key.created <span class="count">61<', chips)
    # Event data: one short line per row; long data folds its full JSON into <details>.
    rows = re.findall(r'<td class="small data-cell">(.*?)</td>', page.text, re.S)
    assert len(rows) == 50 and all("\n" not in r.split("<pre>")[0] for r in rows)
    (folded,) = [r for r in rows if "<details>" in r]
    assert folded.startswith("<details><summary>before={&#34;max_batch&#34;: 1,")
    assert "<pre>{\n  &#34;before&#34;: {\n" in folded
    assert pages._data_line({"from": "erasing", "to": "completed"}) == "from=erasing, to=completed"
    assert pages._data_line({"ids": [1, 2]}) == "ids=[1, 2]" and pages._data_line({}) == "\u2013"
    long = pages._data_line({"reason": "x" * 100})
    assert len(long) == 50 and long.endswith("\u2026")
    with get_engine().begin() as conn:  # someone edits an event in the database
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = 5"))
    status = re.search(
        r'data-testid="chain-status"[^>]*>(.*?)</p>', client.get("/admin/audit").text, re.S
    )
    assert status is not None and "broken" in status.group(1) and "event 5" in status.group(1)


def test_webhooks_page_lists_endpoints_and_failed_deliveries(fresh: AppEnv) -> None:
    admin = create_key("admin")
    r = fresh.client.post(
        "/v1/webhooks",
        headers=auth(admin),
        json={"url": "http://127.0.0.1:9/palimpsest", "events": ["request.completed"]},
    )
    assert r.status_code == 201
    wid = r.json()["id"]
    with session_scope() as s:
        for i, status in enumerate(("delivered", "failed", "pending")):
            s.add(
                WebhookDelivery(
                    endpoint_id=wid,
                    msg_id=f"msg_{i}",
                    event_type="request.completed",
                    status=status,
                    attempts=3 if status == "failed" else 1,
                    failures=3 if status == "failed" else 0,
                    last_status_code=503 if status == "failed" else 200,
                    last_error="HTTP 503" if status == "failed" else None,
                    created_at=utcnow(),
                )
            )
    client = login(fresh, create_key("auditor"))
    page = client.get("/admin/webhooks").text
    endpoints = page[page.index('data-testid="webhook-endpoints"') :]
    assert f'data-webhook-id="{wid}"' in endpoints and "http://127.0.0.1:9/palimpsest" in endpoints
    assert "whsec_" not in page  # secrets are never shown
    deliveries = page[page.index('data-testid="webhook-deliveries"') :]
    assert deliveries.count("<tr data-delivery-id=") == 3 and "HTTP 503" in deliveries
    failed = client.get("/admin/webhooks?failed=1").text
    assert (
        failed[failed.index('data-testid="webhook-deliveries"') :].count("<tr data-delivery-id=")
        == 1
    )
