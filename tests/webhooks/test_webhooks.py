"""Webhooks in process: a real HTTP receiver on 127.0.0.1, deliveries run by calling the
task's function, tasks sent after commit captured instead of going to a broker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import delete, select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.models.webhooks import WebhookDelivery, WebhookEndpoint, WebhookEvent
from tests.support.app_env import AppEnv
from tests.support.factories import (
    assert_error,
    auth,
    make_csv,
    make_rows,
    upload_dataset,
)
from tests.support.outbox import capture_tasks

ALL_EVENTS = [
    "request.received",
    "request.status_changed",
    "request.completed",
    "request.needs_review",
    "request.overdue",
    "job.failed",
    "model.promoted",
]


class Receiver:
    """Records every POST; answers with the queued status codes, then 200."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.codes: list[int] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer.lock:
                    outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sent(env: AppEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Tasks sent after commit (PendingTask), captured; every endpoint removed after."""
    import app.core.db as db

    yield capture_tasks(monkeypatch).sent
    with db.session_scope() as s:
        s.execute(delete(WebhookDelivery))
        s.execute(delete(WebhookEvent))
        s.execute(delete(WebhookEndpoint))


def register(env: AppEnv, key: str, url: str, events: list[str]) -> dict[str, Any]:
    resp = env.client.post("/v1/webhooks", headers=auth(key), json={"url": url, "events": events})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def deliveries(env: AppEnv, key: str, webhook_id: str) -> list[dict[str, Any]]:
    resp = env.client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=auth(key))
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["items"]
    return items


def emit(event_type: str, data: dict[str, Any]) -> None:
    from app.core.db import session_scope
    from app.webhooks import service

    with session_scope() as s:
        service.emit(s, event_type, data)


def deliver_ids(sent: list[Any]) -> list[str]:
    """The deliveries sent, after fanning out every event sent (as the worker does)."""
    from app.webhooks import delivery

    for t in [t for t in sent if t.name.startswith("palimpsest.fan_out_webhook")]:
        assert t.queue == "webhooks"
        if t.name == "palimpsest.fan_out_webhooks":  # several events (a commit, a group)
            delivery.fan_out_many(t.args[0])
        else:
            delivery.fan_out(t.args[0])
    ids = [t.args[0] for t in sent if t.name == "palimpsest.deliver_webhook"]
    assert all(t.queue == "webhooks" for t in sent if t.name == "palimpsest.deliver_webhook")
    sent.clear()
    return ids


def _tasks(sent: list[Any]) -> list[Any]:
    out = list(sent)
    sent.clear()
    return out


def run(delivery_id: str) -> str:
    from app.webhooks import delivery

    return delivery.deliver(delivery_id)


def make_due(delivery_id: str, ago: timedelta = timedelta(0)) -> None:
    from app.core.db import session_scope
    from app.models.base import utcnow
    from app.models.webhooks import WebhookDelivery

    with session_scope() as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None
        d.next_attempt_at = utcnow() - ago


# -- validation and roles -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://127.0.0.1/x", "events": ["request.received"]},
        {"url": "http://user:pw@127.0.0.1/x", "events": ["request.received"]},
        {"url": "http:///nohost", "events": ["request.received"]},
        {"url": "not a url", "events": ["request.received"]},
        {"url": "http://127.0.0.1:99999/x", "events": ["request.received"]},
        {"url": "http://127.0.0.1/x", "events": ["request.deleted"]},
        {"url": "http://127.0.0.1/x", "events": []},
        {"url": "http://127.0.0.1/x"},
        {"events": ["request.received"]},
        {"url": "http://127.0.0.1/x", "events": ["request.received"], "secret": "mine"},
    ],
)
def test_invalid_registrations_are_422(
    env: AppEnv, keys: dict[str, str], sent: list[Any], body: dict[str, Any]
) -> None:
    assert_error(env.client.post("/v1/webhooks", headers=auth(keys["admin"]), json=body), 422)


def test_only_admins_manage_webhooks(env: AppEnv, keys: dict[str, str], sent: list[Any]) -> None:
    hook = register(env, keys["admin"], "http://127.0.0.1:9/h", ["job.failed"])
    calls = [
        ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/h", "events": ["job.failed"]}),
        ("GET", "/v1/webhooks", None),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries", None),
        ("POST", f"/v1/webhooks/{hook['id']}/deliveries/x/redeliver", None),
        ("POST", f"/v1/webhooks/{hook['id']}/rotate-secret", None),
        ("DELETE", f"/v1/webhooks/{hook['id']}", None),
    ]
    for role in ("portal", "auditor"):
        for method, path, body in calls:
            resp = env.client.request(method, path, headers=auth(keys[role]), json=body)
            assert_error(resp, 403, "forbidden")
    for method, path, body in calls:
        assert_error(env.client.request(method, path, json=body), 401, "unauthorized")


def test_create_returns_the_secret_once(env: AppEnv, keys: dict[str, str], sent: list[Any]) -> None:
    hook = register(env, keys["admin"], "http://127.0.0.1:9/h", ["job.failed", "job.failed"])
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["job.failed"]
    Webhook(hook["secret"])  # the library accepts it
    listed = env.client.get("/v1/webhooks", headers=auth(keys["admin"])).json()["items"]
    assert [h["id"] for h in listed] == [hook["id"]]
    assert "secret" not in listed[0] and hook["secret"] not in json.dumps(listed)
    assert listed[0]["enabled"] is True


# -- delivery -------------------------------------------------------------------------


def test_intake_and_cancel_are_signed_events_without_personal_data(
    env: AppEnv, keys: dict[str, str], sent: list[Any], receiver: Receiver
) -> None:
    hook = register(
        env, keys["admin"], receiver.url, ["request.received", "request.status_changed"]
    )
    other = register(env, keys["admin"], receiver.url, ["model.promoted"])
    rows = make_rows(n_subjects=6, rows_per_subject=2, seed=3, subject_prefix="whp")
    upload_dataset(env.client, keys["admin"], "wh-ds", make_csv(rows))
    sent.clear()
    resp = env.client.post(
        "/v1/deletion-requests",
        headers=auth(keys["portal"]),
        json={"kind": "subject", "subject_id": "whp-0001", "reason": "whp-0001 asked"},
    )
    assert resp.status_code == 202, resp.text
    rid = resp.json()["id"]
    (d1,) = deliver_ids(sent)
    assert run(d1) == "delivered"
    cancel = env.client.post(f"/v1/deletion-requests/{rid}/cancel", headers=auth(keys["portal"]))
    assert cancel.status_code < 300, cancel.text
    (d2,) = deliver_ids(sent)
    assert run(d2) == "delivered"

    payloads = []
    for headers, body in receiver.received:
        payloads.append(Webhook(hook["secret"]).verify(body, headers))
        assert b"whp-0001" not in body and b"asked" not in body
        with pytest.raises(WebhookVerificationError):
            Webhook(other["secret"]).verify(body, headers)
    assert [p["type"] for p in payloads] == ["request.received", "request.status_changed"]
    assert payloads[0]["data"]["request_id"] == rid and payloads[0]["data"]["status"] == "received"
    assert len(payloads[0]["data"]["subject_key"]) == 64
    assert (payloads[1]["data"]["from"], payloads[1]["data"]["to"]) == ("received", "cancelled")
    ids = [h["webhook-id"] for h, _ in receiver.received]
    assert len(set(ids)) == 2 and all(i.startswith("msg_") for i in ids)

    log = deliveries(env, keys["admin"], hook["id"])
    assert {(d["status"], d["attempts"], d["last_status_code"]) for d in log} == {
        ("delivered", 1, 200)
    }
    assert deliveries(env, keys["admin"], other["id"]) == []
    # Idempotent: a delivered message is never sent again by the task.
    assert run(d1) == "skipped" and len(receiver.received) == 2


def test_failures_back_off_then_give_up(
    env: AppEnv, keys: dict[str, str], sent: list[Any], receiver: Receiver
) -> None:
    from app.core.db import session_scope
    from app.models.webhooks import WebhookDelivery
    from app.webhooks import delivery

    hook = register(env, keys["admin"], receiver.url, ["job.failed"])
    receiver.codes = [500, 503]
    emit("job.failed", {"job_id": "j1"})
    (did,) = deliver_ids(sent)
    assert run(did) == "pending"
    (retry,) = sent
    assert (retry.name, retry.args, retry.countdown) == ("palimpsest.deliver_webhook", (did,), 5.0)
    (d,) = deliveries(env, keys["admin"], hook["id"])
    assert (d["status"], d["attempts"], d["last_status_code"], d["last_error"]) == (
        "pending",
        1,
        500,
        "HTTP 500",
    )
    assert d["next_attempt_at"] is not None and len(d["history"]) == 1
    sent.clear()
    assert run(did) == "skipped"  # not due yet: an early duplicate sends nothing
    assert len(receiver.received) == 1
    make_due(did)
    assert run(did) == "pending"
    assert [t.countdown for t in _tasks(sent)] == [300.0]
    # The beat's sweep re-sends a delivery whose retry task was lost.
    make_due(did, ago=timedelta(minutes=5))
    assert delivery.sweep() == 1
    assert deliver_ids(sent) == [did]
    # The last scheduled retry fails too: the delivery gives up.
    with session_scope() as s:
        row = s.get(WebhookDelivery, did)
        assert row is not None
        row.failures = len(delivery.RETRY_SCHEDULE)
    receiver.codes = [500]
    assert run(did) == "failed"
    (d,) = deliveries(env, keys["admin"], hook["id"])
    assert (d["status"], d["attempts"], d["next_attempt_at"]) == ("failed", 3, None)
    assert sum(delivery.RETRY_SCHEDULE, timedelta()) > timedelta(days=2.5)


def test_unreachable_receiver_is_retried(
    env: AppEnv, keys: dict[str, str], sent: list[Any]
) -> None:
    closed = Receiver()
    url = closed.url
    closed.close()
    hook = register(env, keys["admin"], url, ["job.failed"])
    emit("job.failed", {"job_id": "j2"})
    (did,) = deliver_ids(sent)
    assert run(did) == "pending"
    (d,) = deliveries(env, keys["admin"], hook["id"])
    assert d["last_status_code"] is None and "ConnectError" in d["last_error"]


def test_gone_disables_the_endpoint(
    env: AppEnv, keys: dict[str, str], sent: list[Any], receiver: Receiver
) -> None:
    hook = register(env, keys["admin"], receiver.url, ["job.failed"])
    receiver.codes = [410]
    emit("job.failed", {"job_id": "a"})
    emit("job.failed", {"job_id": "b"})
    first, second = deliver_ids(sent)
    assert run(first) == "failed"
    assert run(second) == "skipped"  # cancelled with its endpoint
    assert len(receiver.received) == 1
    (listed,) = env.client.get("/v1/webhooks", headers=auth(keys["admin"])).json()["items"]
    assert listed["enabled"] is False and "410" in listed["disabled_reason"]
    assert {d["status"] for d in deliveries(env, keys["admin"], hook["id"])} == {
        "failed",
        "cancelled",
    }
    emit("job.failed", {"job_id": "c"})  # nothing is written for a disabled endpoint
    assert deliver_ids(sent) == [] and len(deliveries(env, keys["admin"], hook["id"])) == 2
    resp = env.client.post(
        f"/v1/webhooks/{hook['id']}/deliveries/{first}/redeliver", headers=auth(keys["admin"])
    )
    assert_error(resp, 409, "webhook_disabled")
    # The receiver is back: an admin re-enables the endpoint; new events reach it and the
    # lost message can be redelivered by hand (same webhook-id).
    receiver.codes = [204]
    admin = auth(keys["admin"])
    resp = env.client.post(f"/v1/webhooks/{hook['id']}/enable", headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["enabled"] is True and resp.json()["disabled_reason"] is None
    assert_error(env.client.post(f"/v1/webhooks/{hook['id']}/enable", headers=admin), 409)
    assert_error(env.client.post("/v1/webhooks/nope/enable", headers=admin), 404)
    emit("job.failed", {"job_id": "d"})
    (fresh,) = deliver_ids(sent)
    assert run(fresh) == "delivered"
    resp = env.client.post(f"/v1/webhooks/{hook['id']}/deliveries/{first}/redeliver", headers=admin)
    assert resp.status_code == 202, resp.text
    assert run(first) == "delivered"
    # The first message (answered 410) arrives again under its own webhook-id.
    assert receiver.received[-1][0]["webhook-id"] == receiver.received[0][0]["webhook-id"]
    assert len(receiver.received) == 3


def test_redeliver_and_rotate_secret(
    env: AppEnv, keys: dict[str, str], sent: list[Any], receiver: Receiver
) -> None:
    admin = auth(keys["admin"])
    hook = register(env, keys["admin"], receiver.url, ["model.promoted"])
    emit("model.promoted", {"model": "m", "to_version": 2})
    (did,) = deliver_ids(sent)
    assert run(did) == "delivered"
    resp = env.client.post(f"/v1/webhooks/{hook['id']}/deliveries/{did}/redeliver", headers=admin)
    assert resp.status_code == 202 and resp.json()["status"] == "pending", resp.text
    assert deliver_ids(sent) == [did]

    rotated = env.client.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=admin)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new.startswith("whsec_") and new != hook["secret"]
    assert run(did) == "delivered"
    (h1, b1), (h2, b2) = receiver.received
    assert h1["webhook-id"] == h2["webhook-id"] and b1 == b2  # the same message again
    Webhook(hook["secret"]).verify(b1, h1)
    Webhook(new).verify(b2, h2)  # the old secret stopped signing at once
    with pytest.raises(WebhookVerificationError):
        Webhook(hook["secret"]).verify(b2, h2)
    (d,) = deliveries(env, keys["admin"], hook["id"])
    assert (d["status"], d["attempts"]) == ("delivered", 2)

    for path in (
        f"/v1/webhooks/{hook['id']}/deliveries/nope/redeliver",
        f"/v1/webhooks/nope/deliveries/{did}/redeliver",
        "/v1/webhooks/nope/rotate-secret",
    ):
        assert_error(env.client.post(path, headers=admin), 404)
    assert env.client.delete(f"/v1/webhooks/{hook['id']}", headers=admin).status_code == 204
    assert_error(env.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=admin), 404)
    assert_error(env.client.delete(f"/v1/webhooks/{hook['id']}", headers=admin), 404)
    assert run(did) == "skipped"


def test_a_rolled_back_change_announces_nothing(
    env: AppEnv, keys: dict[str, str], sent: list[Any]
) -> None:
    from app.core.db import session_scope
    from app.models.webhooks import WebhookDelivery, WebhookEvent
    from app.webhooks import service

    register(env, keys["admin"], "http://127.0.0.1:9/h", ["job.failed"])
    with pytest.raises(RuntimeError), session_scope() as s:
        assert service.emit(s, "job.failed", {"job_id": "x"}).event_type == "job.failed"
        raise RuntimeError("the change failed")
    assert sent == []
    with session_scope() as s:
        assert s.scalars(select(WebhookDelivery)).all() == []
        assert s.scalars(select(WebhookEvent)).all() == []


def test_an_event_is_one_outbox_row_however_many_endpoints(
    env: AppEnv, keys: dict[str, str], sent: list[Any], receiver: Receiver
) -> None:
    """The API request writes one event row and one fan-out task whatever the number of
    endpoints; the worker's fan-out makes one delivery each, once, on the `webhooks`
    queue (so deliveries never wait in front of unlearning or erasure)."""
    from app.core.db import session_scope
    from app.webhooks import delivery

    hooks = [register(env, keys["admin"], receiver.url, ["request.received"]) for _ in range(20)]
    register(env, keys["admin"], receiver.url, ["job.failed"])  # not subscribed
    sent.clear()
    upload_dataset(env.client, keys["admin"], "fan-ds", make_csv(make_rows(n_subjects=3)))
    sent.clear()
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(keys["portal"]),
        json={"kind": "subject", "subject_id": "subj-0001"},
    )
    assert r.status_code == 202
    # Intake's events go out as one fan-out task per group (here a group of one).
    fan = [t for t in sent if t.name == "palimpsest.fan_out_webhooks"]
    assert len(fan) == 1 and fan[0].queue == "webhooks" and len(fan[0].args[0]) == 1
    assert [t.name for t in sent if "webhook" in t.name] == ["palimpsest.fan_out_webhooks"]
    with session_scope() as s:
        assert len(s.scalars(select(WebhookEvent)).all()) == 1
        assert s.scalars(select(WebhookDelivery)).all() == []
    sent.clear()
    assert delivery.fan_out(fan[0].args[0][0]) == 20
    assert delivery.fan_out(fan[0].args[0][0]) == 0  # a redelivered fan-out adds nothing
    assert [t.queue for t in sent] == ["webhooks"] * 20
    with session_scope() as s:
        rows = s.scalars(select(WebhookDelivery)).all()
        assert sorted(d.endpoint_id for d in rows) == sorted(h["id"] for h in hooks)
        assert len({d.msg_id for d in rows}) == 20


def test_the_sweep_fans_out_a_lost_event(
    env: AppEnv, keys: dict[str, str], sent: list[Any]
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from app.core.db import session_scope
    from app.models.base import utcnow
    from app.webhooks import delivery, service

    register(env, keys["admin"], "http://127.0.0.1:9/h", ["job.failed"])
    with session_scope() as s:
        event_id = service.emit(s, "job.failed", {"job_id": "y"}).id
    sent.clear()  # the fan-out task was lost with the broker
    with session_scope() as s:
        s.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(created_at=utcnow() - timedelta(minutes=5))
        )
    assert delivery.sweep() >= 1
    assert [(t.name, t.args) for t in sent] == [("palimpsest.fan_out_webhook", (event_id,))]


def test_an_endpoint_registered_after_an_event_does_not_get_it(
    env: AppEnv, keys: dict[str, str], sent: list[Any], receiver: Receiver
) -> None:
    """The fan-out runs later than the event (its own task): an endpoint registered in
    between hears of what happens from then on, not of what happened before it."""
    from app.webhooks import delivery

    upload_dataset(env.client, keys["admin"], "late-ds", make_csv(make_rows(n_subjects=3)))
    sent.clear()
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(keys["portal"]),
        json={"kind": "subject", "subject_id": "subj-0002"},
    )
    assert r.status_code == 202
    early = [t for t in sent if t.name == "palimpsest.fan_out_webhooks"]
    assert len(early) == 1
    hook = register(env, keys["admin"], receiver.url, ["request.received"])
    sent.clear()
    assert delivery.fan_out(early[0].args[0][0]) == 0  # it happened before the endpoint
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(keys["portal"]),
        json={"kind": "subject", "subject_id": "subj-0003"},
    )
    later = [t for t in sent if t.name == "palimpsest.fan_out_webhooks"]
    assert len(later) == 1 and delivery.fan_out(later[0].args[0][0]) == 1
    from app.core.db import session_scope

    with session_scope() as s:
        mine = s.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == hook["id"]))
        assert [d.event_type for d in mine] == ["request.received"]  # the later one only


def test_one_commit_of_many_events_sends_one_batched_fan_out(
    env: AppEnv, keys: dict[str, str], sent: list[Any]
) -> None:
    """Events announced by one transaction (a batch of requests planned) go to the
    worker as one `palimpsest.fan_out_webhooks` task; a lone event keeps its own task."""
    from app.core.db import session_scope
    from app.webhooks import service

    with session_scope() as s:
        ids = [service.emit(s, "job.failed", {"job_id": f"j{i}"}).id for i in range(3)]
    assert [(t.name, t.args, t.queue) for t in sent] == [
        ("palimpsest.fan_out_webhooks", (ids,), "webhooks")
    ]
    sent.clear()
    with session_scope() as s:
        one = service.emit(s, "job.failed", {"job_id": "alone"}).id
    assert [(t.name, t.args) for t in sent] == [("palimpsest.fan_out_webhook", (one,))]


def test_a_batched_fan_out_makes_the_deliveries_of_one_by_one_fan_outs(
    env: AppEnv, keys: dict[str, str], sent: list[Any]
) -> None:
    """Two identical runs of events, one fanned out event by event, the other in one
    batch: the same deliveries (endpoint, type, payload, message id rule), the same
    counts on the events, the same delivery tasks; an endpoint registered between the
    events gets only the later ones, a disabled one none; a repeat adds nothing."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.core.db import session_scope
    from app.models.base import utcnow
    from app.webhooks import delivery, service

    admin = keys["admin"]
    both = register(env, admin, "http://127.0.0.1:9/both", ["job.failed", "request.overdue"])
    only = register(env, admin, "http://127.0.0.1:9/only", ["request.overdue"])
    off = register(env, admin, "http://127.0.0.1:9/off", ["job.failed"])
    with session_scope() as s:
        s.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == off["id"])
            .values(disabled_at=utcnow())
        )
    kinds = ["job.failed", "request.overdue", "model.promoted", "job.failed"]

    def run() -> list[str]:
        with session_scope() as s:
            early = [service.emit(s, k, {"n": i}).id for i, k in enumerate(kinds[:2])]
        with session_scope() as s:
            late = [service.emit(s, k, {"n": i}).id for i, k in enumerate(kinds[2:])]
            # The later events happen after the late endpoint registers.
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(late))
                .values(created_at=utcnow() + timedelta(minutes=1))
            )
        return early + late

    late_ep = register(env, admin, "http://127.0.0.1:9/late", ["job.failed"])
    with session_scope() as s:
        s.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == late_ep["id"])
            .values(created_at=utcnow() + timedelta(seconds=30))
        )
    one_by_one, batched = run(), run()
    sent.clear()
    made = sum(delivery.fan_out(e) for e in one_by_one)
    single_tasks = [(t.name, t.queue) for t in sent]
    sent.clear()
    assert delivery.fan_out_many(batched) == made == 5
    assert sorted((t.name, t.queue) for t in sent) == sorted(single_tasks)
    assert delivery.fan_out_many(batched) == 0  # redelivered: nothing more

    def shape(events: list[str]) -> list[Any]:
        with session_scope() as s:
            out = []
            for e in events:
                ev = s.get(WebhookEvent, e)
                assert ev is not None and ev.fanned_out_at is not None
                rows = s.scalars(
                    select(WebhookDelivery).where(
                        WebhookDelivery.msg_id.in_(
                            [service.msg_id(e, h["id"]) for h in (both, only, off, late_ep)]
                        )
                    )
                ).all()
                out.append(
                    (
                        ev.deliveries,
                        sorted(
                            (d.endpoint_id, d.event_type, d.status, d.payload["data"]["n"])
                            for d in rows
                        ),
                    )
                )
            return out

    expected = shape(one_by_one)
    assert shape(batched) == expected
    assert [n for n, _ in expected] == [1, 2, 0, 2]
    assert {ep for _, rows in expected for ep, *_ in rows} == {
        both["id"],
        only["id"],
        late_ep["id"],
    }
