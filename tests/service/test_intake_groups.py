"""Intake in groups (app/requests/intake.py): a group of requests is stored by one
transaction exactly as each would be stored alone, repeated keys are replays, a revoked
key is refused inside the group, a failing group falls back to one request at a time,
and concurrent HTTP retries give one request per key. On SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.support.app_env import AppEnv, app_env
from tests.support.database import backends
from tests.support.factories import auth, create_key, make_csv, make_rows, upload_dataset
from tests.support.outbox import capture_tasks

BACKENDS = backends()


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppEnv]:
    with app_env(tmp_path, request.param) as e:
        yield e


@pytest.fixture
def sent(env: AppEnv, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Tasks sent after commit, captured (the in-memory broker would drop them)."""
    return capture_tasks(monkeypatch).sent


def _caller(raw: str) -> Any:
    from app.api.deps import _look_up
    from app.core.security import hash_api_key

    return _look_up(hash_api_key(raw))


def _ticket(caller: Any, key: str | None, **body: Any) -> Any:
    from app.core.settings import get_settings
    from app.requests.intake import Ticket
    from app.requests.schemas import DeletionRequestIn

    return Ticket(DeletionRequestIn(**body), caller, get_settings(), key)


STORED = (
    "kind",
    "status",
    "subject_key",
    "record_ids",
    "source",
    "feature",
    "tokens",
    "model_name",
    "dataset_id",
    "reason",
    "external_ref",
    "api_key_id",
    "n_records",
    "error",
    "completed_at",
    "extended_at",
)


def _row(request_id: str) -> dict[str, Any]:
    from app.core.db import session_scope
    from app.models import DeletionRequest

    with session_scope() as s:
        req = s.get(DeletionRequest, request_id)
        assert req is not None
        return {c: getattr(req, c) for c in STORED} | {"days": (req.due_at - req.received_at).days}


def test_a_group_stores_each_request_as_it_would_be_stored_alone(
    env: AppEnv, sent: list[Any]
) -> None:
    from app.audit.service import verify_chain
    from app.core.db import session_scope
    from app.models import AuditEvent, WebhookEvent
    from app.requests.intake import create_alone, write_group

    admin = create_key("admin")
    upload_dataset(env.client, admin, "g-ds", make_csv(make_rows(n_subjects=6)))
    portal = _caller(create_key("portal", "g-portal"))
    bodies: list[dict[str, Any]] = [
        {"kind": "subject", "subject_id": "subj-0001", "reason": "asked"},
        {"kind": "subject", "subject_id": "nobody-held"},
        {"kind": "source", "source": "clinic-a", "external_ref": "t-1"},
        {"kind": "records", "record_ids": ["r2", "r1", "r1"]},
    ]
    sent.clear()
    tickets = [_ticket(portal, f"g-{i}", **b) for i, b in enumerate(bodies)]
    answers = write_group(tickets)
    ids = []
    for t in tickets:
        accepted, created = answers[id(t)]  # type: ignore[misc]
        assert created and accepted.status == "received"
        ids.append(accepted.id)
    # One planning task and one fan-out task for the whole group.
    tasks = {t.name: t for t in sent}
    assert len(sent) == 2 and tasks["palimpsest.plan_requests"].queue == "default"
    assert sorted(tasks["palimpsest.plan_requests"].args[0]) == sorted(ids)
    assert tasks["palimpsest.fan_out_webhooks"].queue == "webhooks"
    assert len(tasks["palimpsest.fan_out_webhooks"].args[0]) == len(bodies)
    # The same bodies, each stored alone: the same columns.
    for i, b in enumerate(bodies):
        alone, created = create_alone(tickets[i].body, portal, tickets[i].settings, f"a-{i}")
        assert created
        assert _row(alone.id) == _row(ids[i]), b
    counts = {b["kind"] + str(i): _row(ids[i])["n_records"] for i, b in enumerate(bodies)}
    assert counts["subject0"] == 3 and counts["subject1"] == 0 and counts["source2"] > 0
    with session_scope() as s:
        received = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "request.received")
        ).all()
        assert {e.entity_id for e in received} >= set(ids)
        assert len(s.scalars(select(WebhookEvent)).all()) == 2 * len(bodies)
        check = verify_chain(s)
    assert check.intact, check


def test_repeated_keys_in_one_group_are_replays_or_conflicts(env: AppEnv, sent: list[Any]) -> None:
    from app.requests.intake import write_all

    portal = _caller(create_key("portal", "r-portal"))
    same = {"kind": "subject", "subject_id": "subj-0009"}
    tickets = [_ticket(portal, "dup", **same) for _ in range(3)]
    tickets.append(_ticket(portal, "dup", kind="subject", subject_id="someone-else"))
    tickets.append(_ticket(portal, None, **same))
    write_all(tickets)  # one group: the twins wait for the next ones
    outcomes = [t.future.exception(timeout=0) or t.future.result() for t in tickets]
    first, replay1, replay2, other, unkeyed = outcomes
    assert first[1] is True and replay1[1] is False and replay2[1] is False
    assert first[0].id == replay1[0].id == replay2[0].id
    assert getattr(other, "code", None) == "idempotency_key_reused"
    assert unkeyed[1] is True and unkeyed[0].id != first[0].id


def test_a_revoked_key_is_refused_inside_the_group(env: AppEnv, sent: list[Any]) -> None:
    from app.core.db import session_scope
    from app.core.errors import Unauthorized
    from app.keys import find_key, revoke_key
    from app.requests.intake import write_group

    raw = create_key("portal", "soon-revoked")
    kept = _caller(create_key("portal", "kept"))
    known = _caller(raw)  # seen live by this process
    r = env.client.post(
        "/v1/deletion-requests", headers=auth(raw), json={"kind": "source", "source": "x"}
    )
    assert r.status_code == 202, r.text
    with session_scope() as s:
        revoke_key(s, find_key(s, "soon-revoked"))
    gone, live = (
        _ticket(known, None, kind="source", source="x"),
        _ticket(kept, None, kind="source", source="x"),
    )
    answers = write_group([gone, live])
    assert isinstance(answers[id(gone)], Unauthorized)
    assert answers[id(live)][1] is True  # type: ignore[index]
    r = env.client.post(
        "/v1/deletion-requests", headers=auth(raw), json={"kind": "source", "source": "x"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_concurrent_retries_over_http_make_one_request_per_key(env: AppEnv) -> None:
    from app.audit.service import verify_chain
    from app.core.db import session_scope
    from app.models import DeletionRequest

    raw = create_key("portal", "busy-portal")
    keys = [f"k-{i}" for i in range(40)]
    sends = [k for k in keys for _ in range(4)]

    def post(key: str) -> tuple[str, int, str, bool]:
        r = env.client.post(
            "/v1/deletion-requests",
            headers={**auth(raw), "Idempotency-Key": key},
            json={"kind": "subject", "subject_id": f"p-{key}"},
        )
        return key, r.status_code, r.json().get("id", ""), "idempotent-replayed" in r.headers

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, sends))
    assert {status for _, status, _, _ in results} == {202}, results
    by_key: dict[str, set[str]] = {}
    for key, _, rid, _ in results:
        by_key.setdefault(key, set()).add(rid)
    assert all(len(v) == 1 for v in by_key.values()) and len(by_key) == len(keys)
    assert sum(1 for _, _, _, replayed in results if replayed) == len(sends) - len(keys)
    with session_scope() as s:
        stored = s.scalars(select(DeletionRequest.idempotency_key)).all()
        assert sorted(stored) == sorted(keys)
        assert verify_chain(s).intact


def test_a_failing_group_is_stored_one_request_at_a_time(env: AppEnv, sent: list[Any]) -> None:
    """A key longer than the column (refused before a group on the HTTP path; here put
    in a group on purpose) makes PostgreSQL refuse the group's insert: every other
    request is still stored, each alone, and the bad one gets its own 400."""
    if env.database_url.startswith("sqlite"):
        pytest.skip("SQLite does not enforce a column's length")
    from app.requests.intake import write_all

    portal = _caller(create_key("portal", "f-portal"))
    tickets = [_ticket(portal, f"ok-{i}", kind="subject", subject_id=f"s{i}") for i in range(3)]
    tickets.insert(1, _ticket(portal, "x" * 300, kind="subject", subject_id="s-bad"))
    write_all(tickets)
    bad = tickets.pop(1).future.exception(timeout=0)
    assert getattr(bad, "code", None) == "invalid_idempotency_key"
    assert all(t.future.result(timeout=0)[1] for t in tickets)
    # Stored alone: one planning task each, the single-request kind.
    assert sorted(t.name for t in sent if "plan" in t.name) == ["palimpsest.plan_request"] * 3


def test_a_groups_tasks_go_out_after_its_callers_have_their_answers(
    env: AppEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning and the webhooks' fan-out are sent once every ticket of the group is
    answered (the broker's round trips are not in the callers' latency)."""
    from app.core import outbox
    from app.requests.intake import write_all

    portal = _caller(create_key("portal", "t-portal"))
    tickets = [_ticket(portal, f"t-{i}", kind="subject", subject_id=f"t{i}") for i in range(4)]
    seen: list[tuple[str, bool]] = []

    class Sender:
        def send(self, task: outbox.PendingTask) -> None:
            seen.append((task.name, all(t.future.done() for t in tickets)))

        def chord(self, header: Any, callback: Any) -> None:
            raise AssertionError("intake sends no chords")

    monkeypatch.setattr(outbox, "_sender", Sender())
    write_all(tickets)
    assert all(t.future.result(timeout=0)[1] for t in tickets)
    names = sorted(name for name, _ in seen)
    assert names == ["palimpsest.fan_out_webhooks", "palimpsest.plan_requests"], names
    assert all(done for _, done in seen)


def test_held_tasks_are_kept_at_commit_and_dropped_on_rollback(
    env: AppEnv, sent: list[Any]
) -> None:
    from app.core import outbox
    from app.core.db import enqueue, session_scope

    kept: list[outbox.PendingTask] = []
    with session_scope() as s:
        outbox.hold(s, kept)
        enqueue(s, "palimpsest.example", 1)
    assert [t.name for t in kept] == ["palimpsest.example"] and sent == []
    dropped: list[outbox.PendingTask] = []
    with pytest.raises(RuntimeError), session_scope() as s:
        outbox.hold(s, dropped)
        enqueue(s, "palimpsest.example", 2)
        raise RuntimeError("roll back")
    assert dropped == [] and sent == []
    with session_scope() as s:  # an ordinary transaction after them still sends
        enqueue(s, "palimpsest.example", 3)
    assert [t.args for t in sent] == [(3,)]


def test_a_dropped_connection_costs_a_group_one_more_try(env: AppEnv, sent: list[Any]) -> None:
    """Intake's engine skips the ping on checkout; a connection the server dropped
    fails the group's first try and the second, on a fresh connection, stores it."""
    if env.database_url.startswith("sqlite"):
        pytest.skip("a server-side connection exists only on PostgreSQL")
    from sqlalchemy import text

    from app.core.db import session_scope
    from app.requests.intake import write_all

    portal = _caller(create_key("portal", "d-portal"))
    first = _ticket(portal, "d-0", kind="subject", subject_id="d0")
    write_all([first])  # the intake engine's pooled connection now exists
    assert first.future.result(timeout=0)[1] is True
    with session_scope() as s:
        killed = s.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    assert killed and killed >= 1
    second = _ticket(portal, "d-1", kind="subject", subject_id="d1")
    write_all([second])
    assert second.future.result(timeout=0)[1] is True


def test_a_busy_writer_waits_for_as_many_as_last_time_and_no_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The linger: when busy, a group is closed as soon as it is as large as the one
    before (the callers it answered are coming back), else at the linger's end; in a
    quiet moment it takes what is waiting and goes."""
    import time

    from app.requests import intake

    monkeypatch.setattr(intake, "LINGER_SECONDS", 0.5)
    w = intake.Writer(threads=0)  # no thread: the gathering alone
    waiting: list[Any] = [object() for _ in range(6)]

    def gather(first: int, queued: int) -> tuple[int, float]:
        group = waiting[:first]
        for t in waiting[first : first + queued]:
            w.submit(t)
        t0 = time.monotonic()
        w._gather(group)
        return len(group), time.monotonic() - t0

    w._last_end, w._last_size = time.monotonic(), 4
    n, took = gather(1, 5)  # more than last time are there: all taken, no wait
    assert n == 6 and took < 0.25
    w._last_end, w._last_size = time.monotonic(), 3
    n, took = gather(1, 2)  # exactly as many as last time: closed at once
    assert n == 3 and took < 0.25
    w._last_end, w._last_size = time.monotonic(), 5
    n, took = gather(1, 2)  # fewer: waits the whole linger for the rest
    assert n == 3 and took >= 0.45
    w._last_end, w._last_size = time.monotonic() - 1.0, 5
    n, took = gather(1, 1)  # quiet: what is waiting, at once
    assert n == 2 and took < 0.25
