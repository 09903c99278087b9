"""The callback side of the Fides protocol, case by case, against a real HTTP receiver on
127.0.0.1 that answers as Fides's `POST /api/v1/request-task/callback` does (400 while
its task is not yet awaiting, 401 for a bad token, 200 `{"task_queued": true}`). The API
is real (TestClient over a migrated database); the worker's task bodies run in-process,
as the worker calls them. The real-Fides run is test_fides.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.integrations import delivery, sealing
from app.models import AuditEvent
from app.models.base import utcnow
from app.models.integrations import RequestCallback
from app.requests import lifecycle
from tests.dashboard.helpers import login
from tests.support.app_env import AppEnv, app_env
from tests.support.factories import assert_error, auth, create_key

NOT_READY = "with request task status 'in_processing'"
TOKEN = "eyJhbGciOiJBMjU2R0NNIn0.fake-cek.fake-iv.fake-ciphertext.fake-tag"


class FakeFides:
    """Answers callbacks with the next status in `answers` (then 200), keeping what came."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.answers: list[int] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer.lock:
                    if len(outer.received) < 50:
                        headers = {k.lower(): v for k, v in self.headers.items()}
                        outer.received.append((headers, json.loads(body or b"{}")))
                    code = outer.answers.pop(0) if outer.answers else 200
                detail = {
                    200: {"task_queued": True},
                    400: {"detail": f"Callback failed. Cannot queue erasure task ({NOT_READY})"},
                    401: {"detail": "Not Authorized for this action"},
                }[code]
                payload = json.dumps(detail).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/request-task/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fides() -> Iterator[FakeFides]:
    f = FakeFides()
    yield f
    f.server.shutdown()
    f.server.server_close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AppEnv]:
    monkeypatch.setenv("PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    with app_env(tmp_path) as e:
        yield e


def _fides_headers(key: str, url: str, token: str = TOKEN, ref: str = "pri_1") -> dict[str, str]:
    return {
        **auth(key),
        "Idempotency-Key": f"fides-{ref}",
        "reply-to": url,
        "reply-to-token": token,
    }


def _submit(env: AppEnv, key: str, url: str, subject: str, **kw: Any) -> str:
    r = env.client.post(
        "/v1/deletion-requests",
        headers=_fides_headers(key, url, **kw),
        json={"kind": "subject", "subject_id": subject, "external_ref": kw.get("ref", "pri_1")},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _callback(rid: str) -> RequestCallback:
    with session_scope() as s:
        cb = s.scalars(select(RequestCallback).where(RequestCallback.request_id == rid)).one()
        s.expunge(cb)
        return cb


def _finish(rid: str) -> None:
    """What the worker does to a request whose subject nobody holds: plan, then erase."""
    with session_scope() as s:
        lifecycle.plan(s, rid)
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)


def _due_now(cb_id: str) -> None:
    with session_scope() as s:
        s.execute(
            update(RequestCallback)
            .where(RequestCallback.id == cb_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def _actions(rid: str) -> list[str]:
    with session_scope() as s:
        return list(
            s.scalars(
                select(AuditEvent.action).where(AuditEvent.entity_id == rid).order_by(AuditEvent.id)
            )
        )


def test_unheld_subject_completes_with_zero_rows_after_fides_is_ready(
    env: AppEnv, fides: FakeFides
) -> None:
    portal = create_key("portal", "fides")
    # Without Fides's callback headers the same intake is accepted too (no oracle).
    plain = env.client.post(
        "/v1/deletion-requests",
        headers=auth(portal),
        json={"kind": "subject", "subject_id": "nobody@example.org"},
    )
    assert plain.status_code == 202, plain.text

    rid = _submit(env, portal, fides.url, "nobody@example.org")
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(portal)).json()
    assert view["callback"] == {
        "kind": "fides",
        "status": "waiting",
        "attempts": 0,
        "last_error": None,
        "rows_masked": None,
        "target": "127.0.0.1",
        "next_attempt_at": None,
        "delivered_at": None,
    }
    sealed = _callback(rid).token_sealed
    assert TOKEN not in json.dumps(view) and TOKEN not in sealed
    assert sealing.unseal(sealed, get_settings().pepper, rid) == TOKEN
    with pytest.raises(InvalidTag):  # bound to its request: useless on another row
        sealing.unseal(sealed, get_settings().pepper, "another-request")

    _finish(rid)
    cb = _callback(rid)
    assert (cb.status, cb.rows_masked) == ("pending", 0)
    # Fides has not yet marked its task as awaiting: it answers 400, which is retried.
    fides.answers = [400]
    assert delivery.deliver(cb.id) == "pending"
    cb = _callback(rid)
    assert (
        cb.failures == 1 and cb.last_status_code == 400 and "in_processing" in (cb.last_error or "")
    )
    assert cb.next_attempt_at is not None and cb.next_attempt_at > utcnow()
    assert delivery.deliver(cb.id) == "skipped"  # not due yet: nothing is sent
    _due_now(cb.id)
    assert delivery.deliver(cb.id) == "delivered"
    assert delivery.deliver(cb.id) == "skipped"  # a duplicate task sends nothing more

    assert len(fides.received) == 2
    for headers, body in fides.received:
        assert headers["authorization"] == f"Bearer {TOKEN}"
        assert headers["content-type"] == "application/json"
        assert body == {"rows_masked": 0}
    done = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(portal)).json()
    assert done["status"] == "completed" and done["n_records"] is None  # not shown to portals
    assert done["callback"]["status"] == "delivered" and done["callback"]["attempts"] == 2
    actions = _actions(rid)
    assert "integration.nothing_held" in actions and "integration.callback_delivered" in actions

    page = login(env, create_key("admin")).get(f"/admin/requests/{rid}")
    assert page.status_code == 200, page.text
    assert 'data-testid="request-callback"' in page.text and "Fides callback" in page.text
    assert "delivered" in page.text and TOKEN not in page.text


def test_a_replayed_intake_reports_again_with_the_new_token(env: AppEnv, fides: FakeFides) -> None:
    portal = create_key("portal", "fides")
    rid = _submit(env, portal, fides.url, "someone@example.org", ref="pri_2")
    _finish(rid)
    cb = _callback(rid)
    fides.answers = [401]  # the first token was refused for good
    assert delivery.deliver(cb.id) == "failed"
    assert "integration.callback_failed" in _actions(rid)
    assert delivery.sweep(grace=timedelta(0)) == 0  # a failed callback is not re-sent

    # Fides retried its task: same privacy request (same Idempotency-Key), new token.
    again = _submit(env, portal, fides.url, "someone@example.org", ref="pri_2", token=TOKEN + "2")
    assert again == rid
    cb = _callback(rid)
    assert cb.status == "pending" and cb.failures == 0
    assert delivery.deliver(cb.id) == "delivered"
    # The same call repeated (a network retry of Fides's request) sends nothing more.
    assert _submit(env, portal, fides.url, "someone@example.org", ref="pri_2", token=TOKEN + "2")
    assert _callback(rid).status == "delivered"
    assert delivery.sweep(grace=timedelta(0)) == 0
    assert [h["authorization"] for h, _ in fides.received] == [
        f"Bearer {TOKEN}",
        f"Bearer {TOKEN}2",
    ]


def test_a_request_that_does_not_complete_sends_no_callback(env: AppEnv, fides: FakeFides) -> None:
    portal = create_key("portal", "fides")
    rid = _submit(env, portal, fides.url, "late@example.org", ref="pri_3")
    r = env.client.post(f"/v1/deletion-requests/{rid}/cancel", headers=auth(portal))
    assert r.status_code == 200, r.text
    cb = r.json()["callback"]
    assert cb["status"] == "withheld" and "cancelled" in cb["last_error"]
    assert delivery.sweep(grace=timedelta(0)) == 0
    assert fides.received == []
    assert "integration.callback_withheld" in _actions(rid)


def test_callback_details_are_checked_at_intake(env: AppEnv, fides: FakeFides) -> None:
    portal = create_key("portal", "fides")
    body = {"kind": "subject", "subject_id": "x@example.org"}
    r = env.client.post(
        "/v1/deletion-requests", headers={**auth(portal), "reply-to": fides.url}, json=body
    )
    assert_error(r, 400, "incomplete_callback")
    for url in ("http://10.1.2.3/api/v1/request-task/callback", "ftp://127.0.0.1/x"):
        r = env.client.post("/v1/deletion-requests", headers=_fides_headers(portal, url), json=body)
        err = assert_error(r, 422, "callback_url_refused")
        assert TOKEN not in json.dumps(err)
    r = env.client.post(
        "/v1/deletion-requests",
        headers=_fides_headers(portal, fides.url, token="t" * 9000),
        json=body,
    )
    assert_error(r, 400, "invalid_callback")
