"""Whatever goes wrong inside a request, the answer is the JSON error shape: a busy or
unreachable database is a 503 with Retry-After, anything unexpected a JSON 500 (never
a plain-text one). Routes that fail on purpose are added to a real app for this."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.main import create_app


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = create_app()
    failures: dict[str, BaseException] = {
        "locked": OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked")),
        "pool": PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"),
        "bug": RuntimeError("something broke"),
        "deep": RecursionError("maximum recursion depth exceeded"),
    }

    def failing(exc: BaseException) -> Callable[[], None]:
        def fail() -> None:
            raise exc

        return fail

    for name, exc in failures.items():
        app.add_api_route(f"/fail/{name}", failing(exc))
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("name", ["locked", "pool"])
def test_a_busy_database_is_503_with_retry_after(client: TestClient, name: str) -> None:
    r = client.get(f"/fail/{name}")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "busy"
    assert int(r.headers["retry-after"]) > 0


def test_an_unexpected_error_is_a_json_500(client: TestClient) -> None:
    r = client.get("/fail/bug")
    assert r.status_code == 500
    assert r.json() == {
        "error": {"code": "internal_error", "message": "internal error; it has been logged"}
    }
    assert "something broke" not in r.text  # the exception's text stays in the log


def test_deep_nesting_is_422(client: TestClient) -> None:
    r = client.get("/fail/deep")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.put("/v1/webhooks")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
