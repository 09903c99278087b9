"""Intake's fast path (app/requests/fast_path.py): the ordinary `POST /v1/deletion-requests`
is answered without FastAPI's routing and dependencies, with the same answer the endpoint
gives (status, body, headers, errors); anything unusual goes on to FastAPI with its body
intact. Plus the two other intake costs found with it: FastAPI's telemetry checks when
no OpenTelemetry provider is configured, and planner statistics after an ingest."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app.core.db import session_scope
from tests.support.app_env import AppEnv, app_env
from tests.support.database import postgres_admin_url
from tests.support.factories import (
    assert_error,
    auth,
    create_key,
    make_csv,
    make_rows,
    upload_dataset,
)

PATH = "/v1/deletion-requests"
ROWS = make_rows(n_subjects=8, rows_per_subject=2, seed=5, subject_prefix="fi")


@pytest.fixture(scope="module")
def dataset(env: AppEnv, keys: dict[str, str]) -> dict[str, Any]:
    return upload_dataset(env.client, keys["admin"], "fast-intake-ds", make_csv(ROWS))


@pytest.fixture
def callers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The module that called `intake.accept` for each request: which path answered."""
    from app.requests import intake

    seen: list[str] = []
    real = intake.accept

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(sys._getframe(1).f_globals["__name__"])
        return await real(*args, **kwargs)

    monkeypatch.setattr(intake, "accept", spy)
    return seen


@pytest.fixture
def through_fastapi(env: AppEnv) -> Iterator[Callable[[], None]]:
    """Call it to send the next requests through FastAPI (an app with dependency
    overrides is one the fast path leaves alone); undone afterwards."""
    from app.api.deps import current_settings

    app: Any = env.client.app
    yield lambda: app.dependency_overrides.__setitem__(current_settings, current_settings)
    app.dependency_overrides.clear()


def post(env: AppEnv, key: str, body: Any, **headers: str) -> Any:
    return env.client.post(PATH, headers={**auth(key), **headers}, json=body)


def _shape(resp: Any) -> tuple[int, list[str], dict[str, type]]:
    """What must match between the two paths: status, header names, body fields."""
    names = sorted(k for k in resp.headers if k not in ("date", "server"))
    return resp.status_code, names, {k: type(v) for k, v in resp.json().items()}


def test_an_ordinary_request_is_answered_by_the_fast_path_as_the_endpoint_would(
    env: AppEnv,
    keys: dict[str, str],
    dataset: dict[str, Any],
    callers: list[str],
    through_fastapi: Callable[[], None],
) -> None:
    key = create_key("portal", "fast-a")
    post(env, key, {"kind": "subject", "subject_id": "fi-0000"})  # the key is now known
    fast = post(env, key, {"kind": "subject", "subject_id": "fi-0001"}, **{"Idempotency-Key": "a"})
    again = post(env, key, {"kind": "subject", "subject_id": "fi-0001"}, **{"Idempotency-Key": "a"})
    through_fastapi()
    slow = post(env, key, {"kind": "subject", "subject_id": "fi-0002"}, **{"Idempotency-Key": "b"})
    slow_again = post(
        env, key, {"kind": "subject", "subject_id": "fi-0002"}, **{"Idempotency-Key": "b"}
    )
    assert callers == [
        "app.requests.router",  # an unknown key: FastAPI looks it up
        "app.requests.fast_path",
        "app.requests.fast_path",
        "app.requests.router",
        "app.requests.router",
    ]
    assert fast.status_code == 202 and fast.json()["status"] == "received"
    assert _shape(fast) == _shape(slow)
    assert _shape(again) == _shape(slow_again)
    assert again.headers["idempotent-replayed"] == "true" and again.json() == fast.json()
    assert "idempotent-replayed" not in fast.headers
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    assert len(fast.headers["x-request-id"]) > 0
    # Stored as the endpoint stores it, with the key's count of records.
    for resp in (fast, slow):
        view = env.client.get(f"{PATH}/{resp.json()['id']}", headers=auth(keys["admin"]))
        assert view.json()["kind"] == "subject" and view.json()["n_records"] == 2


def test_errors_on_the_fast_path_are_the_endpoints_errors(
    env: AppEnv,
    keys: dict[str, str],
    dataset: dict[str, Any],
    callers: list[str],
    through_fastapi: Callable[[], None],
) -> None:
    from app.keys import find_key, revoke_key

    key = create_key("portal", "fast-b")
    post(env, key, {"kind": "source", "source": "s1"})
    long_key = {"Idempotency-Key": "k" * 201}
    reused = {"Idempotency-Key": "same"}
    answers = []
    for slow in (False, True):
        if slow:
            through_fastapi()
        bad_key = post(env, key, {"kind": "source", "source": "s1"}, **long_key)
        first = post(env, key, {"kind": "source", "source": "s1"}, **reused)
        other_body = post(env, key, {"kind": "source", "source": "s2"}, **reused)
        answers.append((bad_key, first, other_body))
        reused = {"Idempotency-Key": "same-2"}
    assert callers.count("app.requests.fast_path") == 3
    for bad_key, first, other_body in answers:
        assert_error(bad_key, 400)
        assert first.status_code == 202
        assert_error(other_body, 409, "idempotency_key_reused")
    (fast_bad, _, fast_reused), (slow_bad, _, slow_reused) = answers
    assert fast_bad.json() == slow_bad.json() and fast_reused.json() == slow_reused.json()

    # A key revoked after this process cached it: refused by the group's transaction.
    with session_scope() as s:
        revoke_key(s, find_key(s, "fast-b"))
    env.client.app.dependency_overrides.clear()  # type: ignore[attr-defined]
    gone = post(env, key, {"kind": "source", "source": "s1"})
    assert callers[-1] == "app.requests.fast_path"
    assert_error(gone, 401, "unauthorized")


@pytest.mark.parametrize(
    ("why", "body", "headers"),
    [
        ("an unknown field", {"kind": "subject", "subject_id": "x", "extra": 1}, {}),
        ("two targets", {"kind": "subject", "subject_id": "x", "source": "y"}, {}),
        ("not an object", ["kind", "subject"], {}),
        (
            "a callback",
            {"kind": "subject", "subject_id": "x"},
            {"Reply-To": "http://10.0.0.1/", "Reply-To-Token": "t"},
        ),
    ],
)
def test_what_the_fast_path_leaves_goes_to_fastapi_and_gets_its_answer(
    env: AppEnv,
    keys: dict[str, str],
    callers: list[str],
    why: str,
    body: Any,
    headers: dict[str, str],
) -> None:
    post(env, keys["portal"], {"kind": "source", "source": "warm"})  # the key is known
    callers.clear()
    resp = post(env, keys["portal"], body, **headers)
    assert resp.status_code in (400, 422), (why, resp.text)
    error = assert_error(resp)
    if "Reply-To" in headers:  # refused at intake: nothing is ever sent to a private host
        assert error["code"] == "callback_url_refused", error
    assert callers in ([], ["app.requests.router"]), why


def test_other_keys_and_content_go_to_fastapi(
    env: AppEnv, keys: dict[str, str], callers: list[str]
) -> None:
    assert_error(post(env, "plm_not-a-key", {"kind": "source", "source": "a"}), 401)
    post(env, keys["auditor"], {"kind": "source", "source": "a"})
    assert_error(post(env, keys["auditor"], {"kind": "source", "source": "a"}), 403)
    raw = env.client.post(
        PATH,
        headers={**auth(keys["portal"]), "Content-Type": "text/plain"},
        content=json.dumps({"kind": "source", "source": "a"}),
    )
    assert raw.status_code in (202, 422), raw.text  # whatever FastAPI makes of it
    assert callers.count("app.requests.fast_path") == 0


def _asgi(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes):  # type: ignore[no-untyped-def]
    """Run one request through `app` in pieces of 3 bytes; (messages sent, body seen)."""
    chunks = [body[i : i + 3] for i in range(0, len(body), 3)] or [b""]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_request_left_to_fastapi_arrives_with_its_whole_body() -> None:
    from fastapi import FastAPI

    from app.requests.fast_path import FastIntake

    seen: list[bytes] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    fast = FastIntake(inner, FastAPI())
    payload = json.dumps({"kind": "subject", "subject_id": "someone"}).encode()
    plain = [(b"content-type", b"application/json"), (b"authorization", b"Bearer plm_unknown")]
    cases = [
        ("POST", PATH, plain),  # a key this process has not seen
        ("POST", PATH, [(b"content-type", b"application/json")]),  # no key at all
        ("POST", PATH + "/", plain),
        ("PUT", PATH, plain),
        ("POST", PATH, [*plain, (b"authorization", b"Bearer x")]),  # a repeated header
        ("POST", PATH, [*plain, (b"reply-to-token", b"t")]),
    ]
    for method, path, headers in cases:
        sent = _asgi(fast, method, path, headers, payload)
        assert sent[0]["status"] == 299, (method, path, headers)
    assert seen == [payload] * len(cases)


def test_fastapi_telemetry_is_off_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.main import _telemetry

    assert _telemetry() == {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert _telemetry() == {}


@pytest.fixture
def pg_env(tmp_path: Path) -> Iterator[AppEnv]:
    if postgres_admin_url() is None:
        pytest.skip("PALIMPSEST_TEST_POSTGRES_URL is not set")
    with app_env(tmp_path, "postgresql") as e:
        yield e


def test_an_ingest_leaves_the_planner_statistics_of_what_it_wrote(pg_env: AppEnv) -> None:
    """Without them intake's count by subject key was planned as a scan of every live
    record (estimated at a handful of rows), cost growing with the dataset."""
    admin = create_key("admin")
    rows = make_rows(n_subjects=400, rows_per_subject=2, seed=3, subject_prefix="st")
    upload_dataset(pg_env.client, admin, "stats-ds", make_csv(rows))
    with session_scope() as s:
        tuples = dict(
            s.execute(
                text(
                    "SELECT relname, reltuples FROM pg_class"
                    " WHERE relname IN ('records', 'subjects', 'sources')"
                )
            ).all()
        )
        statuses = s.execute(
            text(
                "SELECT n_distinct FROM pg_stats WHERE tablename = 'records' AND attname = 'status'"
            )
        ).scalar()
    assert tuples["records"] == 800 and tuples["subjects"] == 400
    assert statuses == 1  # every record is active, and the planner knows it
