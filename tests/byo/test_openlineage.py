"""OpenLineage run events from training and unlearning jobs, posted to a local receiver
(HTTP on 127.0.0.1) or logged (console); off by default; a receiver that is down never
fails a job."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.core.settings import get_settings
from tests.byo.flows import erase_subject
from tests.support.app_env import AppEnv, app_env
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openlineage") is None,
    reason="openlineage-python is not installed (pip install -e '.[dev]')",
)


class Receiver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", 0))
                outer.paths.append(self.path)
                outer.events.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, job: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["job"]["name"] == job]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[AppEnv]:
    keys = ("PALIMPSEST_OPENLINEAGE_TRANSPORT", "PALIMPSEST_OPENLINEAGE_URL")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["PALIMPSEST_OPENLINEAGE_TRANSPORT"] = "http"
    os.environ["PALIMPSEST_OPENLINEAGE_URL"] = receiver.url
    try:
        with app_env(tmp_path_factory.mktemp("env")) as e:
            yield e
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def _version(dataset: dict[str, Any]) -> str:
    return str(dataset["facets"]["version"]["datasetVersion"])


def test_training_and_unlearning_emit_run_events(env: AppEnv, receiver: Receiver) -> None:
    admin = create_key("admin")
    ds = upload_dataset(
        env.client, admin, "lineage-ds", make_csv(n_subjects=20, rows_per_subject=2)
    )
    create_model(env.client, admin, ds["id"], "lin", architecture={"kind": "logreg"})
    train = receiver.of("lin.train")
    assert [e["eventType"] for e in train] == ["START", "COMPLETE"]
    assert set(receiver.paths) == {"/api/v1/lineage"}
    assert train[0]["run"]["runId"] == train[1]["run"]["runId"]
    (inp,) = train[1]["inputs"]
    assert inp["name"] == "datasets/lineage-ds" and _version(inp) == f"{ds['id']}:40"
    (out,) = train[1]["outputs"]
    assert out["name"] == "models/lin" and _version(out) == "1"
    assert train[1]["job"]["namespace"] == "palimpsest"

    view = erase_subject(env.client, admin, "subj-0003")
    assert view["status"] == "completed", view
    unlearn = receiver.of("lin.unlearn")
    assert [e["eventType"] for e in unlearn] == ["START", "COMPLETE"]
    assert unlearn[1]["run"]["runId"] != train[1]["run"]["runId"]
    # The dataset version in is the one the job read (the subject's 2 rows are out).
    assert _version(unlearn[1]["inputs"][0]) == f"{ds['id']}:38"
    assert _version(unlearn[1]["outputs"][0]) == "2"


def test_console_transport_and_a_receiver_that_is_down(
    env: AppEnv,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "lineage-2", make_csv(n_subjects=10, rows_per_subject=2))
    monkeypatch.setenv("PALIMPSEST_OPENLINEAGE_TRANSPORT", "console")
    get_settings.cache_clear()
    with caplog.at_level(logging.INFO):
        create_model(env.client, admin, ds["id"], "lin-console", architecture={"kind": "logreg"})
    logged = [r.getMessage() for r in caplog.records if "lin-console.train" in r.getMessage()]
    assert len(logged) == 2 and '"COMPLETE"' in logged[1]
    assert receiver.of("lin-console.train") == []

    with socket_closed() as url:
        monkeypatch.setenv("PALIMPSEST_OPENLINEAGE_TRANSPORT", "http")
        monkeypatch.setenv("PALIMPSEST_OPENLINEAGE_URL", url)
        get_settings.cache_clear()
        create_model(env.client, admin, ds["id"], "lin-down", architecture={"kind": "logreg"})
    got = env.client.get("/v1/models/lin-down", headers=auth(admin)).json()
    assert got["production_version"] == 1
    get_settings.cache_clear()


class socket_closed:
    """A URL on 127.0.0.1 where nothing listens."""

    def __enter__(self) -> str:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        return None
