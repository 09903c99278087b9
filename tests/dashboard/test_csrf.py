"""Every action is a POST carrying the session's CSRF token; auditors change nothing.
A refused POST leaves no trace: no status change, no audit event."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.db import session_scope
from app.models import AuditEvent, DeletionRequest
from tests.dashboard.helpers import csrf_token, login, seed_request
from tests.support.app_env import AppEnv

ACTIONS = [
    ("cancel", {}),
    ("extend", {"reason": "the controller needs the processor's logs"}),
    ("review", {"action": "approve"}),
]


def _new_request(status: str = "received") -> str:
    with session_scope() as s:
        return seed_request(s, status=status).id


def _state(rid: str) -> tuple[str, object, int]:
    with session_scope() as s:
        req = s.get(DeletionRequest, rid)
        assert req is not None
        events = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
        return req.status, req.due_at, int(events)


@pytest.fixture(scope="module")
def admin(env: AppEnv, keys: dict[str, str]) -> TestClient:
    return login(env, keys["admin"])


@pytest.fixture(scope="module")
def auditor(env: AppEnv, keys: dict[str, str]) -> TestClient:
    return login(env, keys["auditor"])


@pytest.mark.parametrize(("action", "fields"), ACTIONS)
@pytest.mark.parametrize("token", [None, "", "wrong", "other-session"])
def test_missing_or_wrong_token_is_403_and_changes_nothing(
    env: AppEnv,
    keys: dict[str, str],
    admin: TestClient,
    action: str,
    fields: dict[str, str],
    token: str | None,
) -> None:
    rid = _new_request("needs_review" if action == "review" else "received")
    data = dict(fields)
    if token == "other-session":
        # A genuine token, but of another admin session.
        data["csrf_token"] = csrf_token(login(env, keys["admin"]))
    elif token is not None:
        data["csrf_token"] = token
    before = _state(rid)
    r = admin.post(f"/admin/requests/{rid}/{action}", data=data)
    assert r.status_code == 403
    assert 'data-testid="error"' in r.text
    assert _state(rid) == before


@pytest.mark.parametrize(("action", "fields"), ACTIONS)
def test_auditor_actions_are_403_even_with_a_valid_token(
    auditor: TestClient, action: str, fields: dict[str, str]
) -> None:
    rid = _new_request("needs_review" if action == "review" else "received")
    before = _state(rid)
    token = csrf_token(auditor, f"/admin/requests/{rid}")
    r = auditor.post(f"/admin/requests/{rid}/{action}", data={**fields, "csrf_token": token})
    assert r.status_code == 403 and 'data-testid="error"' in r.text
    assert _state(rid) == before


def test_auditor_pages_render_no_action_forms(auditor: TestClient) -> None:
    for status in ("received", "needs_review"):
        rid = _new_request(status)
        page = auditor.get(f"/admin/requests/{rid}")
        assert page.status_code == 200
        assert "data-action=" not in page.text.replace("li data-action=", "")
        assert not re.search(r"<form[^>]*data-action", page.text)
    assert not re.search(r"<form[^>]*data-action", auditor.get("/admin/review").text)


def test_admin_cancel_with_token(admin: TestClient) -> None:
    rid = _new_request()
    page = admin.get(f"/admin/requests/{rid}")
    assert re.search(r'<form[^>]*data-action="cancel"', page.text)
    assert re.search(r'<form[^>]*data-action="extend"', page.text)
    assert not re.search(r'<form[^>]*data-action="approve"', page.text)  # not in review
    token = csrf_token(admin, f"/admin/requests/{rid}")
    r = admin.post(f"/admin/requests/{rid}/cancel", data={"csrf_token": token})
    assert r.status_code == 303
    assert r.headers["location"] == f"/admin/requests/{rid}?done=cancel"
    assert _state(rid)[0] == "cancelled"
    page = admin.get(r.headers["location"])
    assert 'data-testid="flash"' in page.text
    assert re.search(r'data-testid="request-status"[^>]*>cancelled<', page.text)
    with session_scope() as s:
        ev = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_id == rid, AuditEvent.action == "request.status_changed")
            .order_by(AuditEvent.id.desc())
        ).first()
        assert ev is not None and ev.actor == "key:test-admin" and ev.data["to"] == "cancelled"


def test_admin_extend_once_then_409(admin: TestClient) -> None:
    rid = _new_request()
    status, due, _ = _state(rid)
    token = csrf_token(admin, f"/admin/requests/{rid}")
    r = admin.post(
        f"/admin/requests/{rid}/extend",
        data={"csrf_token": token, "reason": "complex request: many systems", "days": "30"},
    )
    assert r.status_code == 303
    _, new_due, events = _state(rid)
    assert new_due - due == timedelta(days=30)  # type: ignore[operator]
    again = admin.post(
        f"/admin/requests/{rid}/extend", data={"csrf_token": token, "reason": "once more please"}
    )
    assert again.status_code == 409
    assert 'data-testid="flash-error"' in again.text and "already extended" in again.text
    assert _state(rid) == (status, new_due, events)


@pytest.mark.parametrize(
    "fields",
    [{"reason": "x"}, {"reason": "fine reason", "days": "abc"}, {"reason": "ok!", "days": "99"}],
)
def test_bad_extend_input_is_400(admin: TestClient, fields: dict[str, str]) -> None:
    rid = _new_request()
    before = _state(rid)
    token = csrf_token(admin, f"/admin/requests/{rid}")
    r = admin.post(f"/admin/requests/{rid}/extend", data={"csrf_token": token, **fields})
    assert r.status_code == 400 and 'data-testid="flash-error"' in r.text
    assert _state(rid) == before


def test_service_refusal_rerenders_with_its_status_and_leaves_no_trace(admin: TestClient) -> None:
    rid = _new_request("unlearning")
    before = _state(rid)
    token = csrf_token(admin, f"/admin/requests/{rid}")
    r = admin.post(f"/admin/requests/{rid}/cancel", data={"csrf_token": token})
    assert r.status_code == 409
    assert 'data-testid="flash-error"' in r.text and "no longer be cancelled" in r.text
    r = admin.post(f"/admin/requests/{rid}/review", data={"csrf_token": token, "action": "approve"})
    assert r.status_code == 409 and "needs_review" in r.text
    assert _state(rid) == before


def test_unknown_request_or_action_is_4xx(admin: TestClient) -> None:
    token = csrf_token(admin)
    r = admin.post("/admin/requests/nope/cancel", data={"csrf_token": token})
    assert r.status_code == 404
    rid = _new_request("needs_review")
    r = admin.post(f"/admin/requests/{rid}/review", data={"csrf_token": token, "action": "drop"})
    assert r.status_code == 400
    assert _state(rid)[0] == "needs_review"
