"""One HTTP request can be followed into the worker: its id is echoed to the client,
carried by every task it enqueues, restored in the worker, and printed in JSON logs."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from app.core.db import PendingTask
from app.core.logging import HEADER, JsonFormatter, new_request_id, request_id_var
from tests.support.app_env import AppEnv
from workers.celery_app import _clear_request_id, _restore_request_id


def test_the_api_echoes_or_makes_a_request_id(env: AppEnv) -> None:
    r = env.client.get("/healthz", headers={"X-Request-ID": "portal-123"})
    assert r.headers["X-Request-ID"] == "portal-123"
    made = env.client.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32
    # Not a place to inject log syntax: a hostile id is replaced.
    assert (
        env.client.get("/healthz", headers={"X-Request-ID": 'a"\n{'}).headers["X-Request-ID"]
        != 'a"\n{'
    )
    assert new_request_id("x" * 101) != "x" * 101


def test_tasks_carry_it_and_the_worker_restores_it() -> None:
    token = request_id_var.set("req-42")
    try:
        task = PendingTask("palimpsest.plan_request", ("r1",))
    finally:
        request_id_var.reset(token)
    assert task.request_id == "req-42"
    fake = SimpleNamespace(request=SimpleNamespace(**{HEADER: "req-42"}))
    _restore_request_id(task=fake)
    assert request_id_var.get() == "req-42"
    _clear_request_id(task=fake)
    assert request_id_var.get() is None


def test_json_log_lines() -> None:
    token = request_id_var.set("req-7")
    try:
        record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        doc = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert doc["message"] == "hello you" and doc["request_id"] == "req-7"
    assert doc["level"] == "INFO" and doc["logger"] == "app.x"


def test_access_log_lines_carry_the_id_and_no_subject_id(env: AppEnv) -> None:
    import io

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("palimpsest.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        env.client.get("/healthz", headers={"X-Request-ID": "portal-9"})
        env.client.get("/v1/subjects/alice@example.org/lineage", headers={"X-Request-ID": "r-2"})
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["request_id"], d["message"]) for d in lines] == [
        ("portal-9", "GET /healthz 200"),
        ("r-2", "GET /v1/subjects/[redacted]/lineage 401"),
    ]
    assert all(d["duration_ms"] >= 0 for d in lines)
    assert "alice" not in out.getvalue()
