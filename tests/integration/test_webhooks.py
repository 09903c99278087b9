"""A receiver on 127.0.0.1 subscribed to every event gets a subject erasure's whole life,
each message signed per Standard Webhooks, delivered by the real worker process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from app.core.security import subject_key
from app.stack import LocalStack
from tests.integration.flows import erase, ingest, make_csv, train

EVENTS = [
    "request.received",
    "request.status_changed",
    "request.completed",
    "request.needs_review",
    "request.overdue",
    "job.failed",
    "model.promoted",
]
CHAIN = ["received", "planned", "unlearning", "verifying", "erasing", "completed"]


class Receiver:
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer.lock:
                    if len(outer.received) < 200:  # bounded, whatever happens
                        outer.received.append(
                            ({k.lower(): v for k, v in self.headers.items()}, body)
                        )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.received)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_a_subject_erasure_is_announced_signed_and_in_order(
    stack: LocalStack, receiver: Receiver
) -> None:
    admin = httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('admin', 'ops')}"},
        timeout=30,
    )
    portal = httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('portal', 'dpo')}"},
        timeout=30,
    )
    ds = ingest(admin, "people", make_csv(n_subjects=120, per_subject=4, seed=5))
    train(
        admin,
        {
            "name": "small",
            "dataset_id": ds["id"],
            "architecture": {"kind": "logreg"},
            "training": {"epochs": 3, "batch_size": 64, "lr": 0.05, "seed": 1},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2, "sharding": "subject"},
            "verification": {"utility_max_drop": 0.15},
        },
    )
    resp = admin.post("/v1/webhooks", json={"url": receiver.url, "events": EVENTS})
    assert resp.status_code == 201, resp.text
    hook = resp.json()
    verifier = Webhook(hook["secret"])

    done = erase(portal, {"kind": "subject", "subject_id": "p0007"})
    assert done["status"] == "completed", done
    rid = done["id"]
    # received + 5 status changes + completed + promoted
    deadline = time.monotonic() + 90
    while len(receiver.snapshot()) < 8 and time.monotonic() < deadline:
        time.sleep(0.3)
    received = receiver.snapshot()

    events = []
    for headers, body in received:
        events.append(verifier.verify(body, headers))  # raises unless correctly signed
        assert b"p0007" not in body
    ids = [h["webhook-id"] for h, _ in received]
    assert len(set(ids)) == len(ids), "a message was delivered twice"
    # Events are delivered by concurrent tasks: their own timestamps give the order.
    events.sort(key=lambda e: e["timestamp"])
    types = [e["type"] for e in events]
    assert types[0] == "request.received", types
    assert types.count("request.completed") == 1 and types.count("model.promoted") == 1, types
    assert not {"job.failed", "request.needs_review"} & set(types), types

    changes = [e["data"] for e in events if e["type"] == "request.status_changed"]
    assert all(c["request_id"] == rid for c in changes)
    assert [c["from"] for c in changes] + [changes[-1]["to"]] == CHAIN, changes
    key = subject_key("p0007", stack.pepper)
    assert events[0]["data"]["request_id"] == rid and events[0]["data"]["subject_key"] == key

    def at(kind: str, **match: Any) -> str:
        (e,) = [
            e
            for e in events
            if e["type"] == kind and all(e["data"].get(k) == v for k, v in match.items())
        ]
        return str(e["timestamp"])

    promoted = next(e for e in events if e["type"] == "model.promoted")
    assert promoted["data"]["model"] == "small"
    assert (promoted["data"]["from_version"], promoted["data"]["to_version"]) == (1, 2)
    assert at("request.status_changed", to="verifying") <= at("model.promoted")
    assert at("model.promoted") <= at("request.status_changed", to="completed")
    assert at("request.status_changed", to="completed") <= at("request.completed")
    assert next(e for e in events if e["type"] == "request.completed")["data"]["request_id"] == rid

    log = admin.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
    assert len(log) == len(events) and {d["status"] for d in log} == {"delivered"}
    assert {d["last_status_code"] for d in log} == {204}
