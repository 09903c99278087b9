"""The audit log is a hash chain: a changed, removed or reordered event is detected and
located, by the service, `palimpsest audit verify` and `GET /v1/audit/verify`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, text
from typer.testing import CliRunner

from app.cli import cli
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key

N_EVENTS = 8
runner = CliRunner()


@pytest.fixture(autouse=True)
def chain(env: AppEnv) -> None:
    """Each test's fresh database (tampering is destructive) holds N_EVENTS events."""
    from app.audit import service as audit
    from app.core.db import session_scope

    for i in range(N_EVENTS):
        with session_scope() as s:  # one transaction each, as in production
            audit.record(
                s,
                actor=f"key:tester-{i % 3}",
                action="request.status_changed",
                entity_type="deletion_request",
                entity_id=f"req-{i}",
                data={"from": "planned", "to": "erasing", "n": i, "note": "é"},
            )


def _ids() -> list[int]:
    from app.core.db import get_engine

    with get_engine().connect() as conn:
        return [int(r[0]) for r in conn.execute(text("SELECT id FROM audit_events ORDER BY id"))]


def _tamper(fn: Callable[[Connection], Any]) -> None:
    """Write straight to the table, as someone with database access would."""
    from app.core.db import get_engine

    with get_engine().begin() as conn:
        fn(conn)


def _check() -> Any:
    from app.audit.service import verify_chain
    from app.core.db import session_scope

    with session_scope() as s:
        return verify_chain(s)


def _api(env: AppEnv) -> dict[str, Any]:
    resp = env.client.get("/v1/audit/verify", headers=auth(create_key("auditor")))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _assert_broken_at(env: AppEnv, bad_id: int, reason: str) -> None:
    check = _check()
    assert (check.intact, check.first_bad_id) == (False, bad_id), check
    assert reason in str(check.reason)
    api = _api(env)
    assert api["intact"] is False and api["first_bad_id"] == bad_id
    result = runner.invoke(cli, ["audit", "verify"])
    assert result.exit_code == 1, result.output
    assert f"BROKEN at event {bad_id}" in result.output


def test_untampered_chain_is_intact(env: AppEnv) -> None:
    check = _check()
    assert check.intact and check.first_bad_id is None
    # The keys created for the API check add events of their own.
    assert check.events >= N_EVENTS
    api = _api(env)
    assert api["intact"] is True and api["first_bad_id"] is None
    result = runner.invoke(cli, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "intact" in result.output


def test_small_batches_walk_the_whole_chain(env: AppEnv) -> None:
    from app.audit.service import verify_chain
    from app.core.db import session_scope

    ids = _ids()
    _tamper(
        lambda c: c.execute(
            text("UPDATE audit_events SET actor = 'x' WHERE id = :i"), {"i": ids[-1]}
        )
    )
    with session_scope() as s:
        check = verify_chain(s, batch=3)
    assert (check.intact, check.first_bad_id, check.events) == (False, ids[-1], len(ids) - 1)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("data", '{"from": "planned", "to": "erasing", "n": 999, "note": "é"}'),
        ("actor", "key:someone-else"),
        ("action", "request.cancelled"),
        ("entity_id", "req-other"),
        ("at", "2020-01-01 00:00:00.000000"),
    ],
)
@pytest.mark.parametrize("k", [0, 3, N_EVENTS - 1])
def test_changed_event_is_located(env: AppEnv, k: int, column: str, value: str) -> None:
    ids = _ids()
    _tamper(
        lambda c: c.execute(
            text(f"UPDATE audit_events SET {column} = :v WHERE id = :i"), {"v": value, "i": ids[k]}
        )
    )
    _assert_broken_at(env, ids[k], "event content does not match its hash")


def test_rehashing_a_changed_event_is_caught_at_the_next_one(env: AppEnv) -> None:
    """Someone who recomputes the changed event's own hash still breaks the link to it."""
    from app.audit.service import _digest
    from app.core.db import session_scope
    from app.models import AuditEvent

    ids = _ids()
    k = 2
    with session_scope() as s:
        ev = s.get(AuditEvent, ids[k])
        assert ev is not None
        ev.data = {**ev.data, "n": 1234}
        ev.hash = _digest(
            ev.prev_hash, ev.at, ev.actor, ev.action, ev.entity_type, ev.entity_id, ev.data
        )
    _assert_broken_at(env, ids[k + 1], "prev_hash does not match")


@pytest.mark.parametrize("k", [0, 4])
def test_removed_event_is_located(env: AppEnv, k: int) -> None:
    ids = _ids()
    _tamper(lambda c: c.execute(text("DELETE FROM audit_events WHERE id = :i"), {"i": ids[k]}))
    # The gap shows at the event that followed the removed one.
    _assert_broken_at(env, ids[k + 1], "prev_hash does not match")


COLUMNS = ("at", "actor", "action", "entity_type", "entity_id", "data", "prev_hash", "hash")


def _swap(conn: Connection, a: int, b: int) -> None:
    """Exchange two events' whole contents (ids stay): the log read in id order is
    reordered. `hash` is unique, so park one row's hash first."""
    cols = ", ".join(COLUMNS)
    row_a = conn.execute(text(f"SELECT {cols} FROM audit_events WHERE id = :i"), {"i": a}).one()
    row_b = conn.execute(text(f"SELECT {cols} FROM audit_events WHERE id = :i"), {"i": b}).one()
    conn.execute(text("UPDATE audit_events SET hash = 'parked' WHERE id = :i"), {"i": a})
    assign = ", ".join(f"{c} = :{c}" for c in COLUMNS)
    for target, row in ((b, row_a), (a, row_b)):
        values = dict(zip(COLUMNS, row, strict=True))
        if not isinstance(values["data"], str):  # PostgreSQL hands JSON back decoded
            values["data"] = json.dumps(values["data"])
        conn.execute(
            text(f"UPDATE audit_events SET {assign} WHERE id = :id"), {**values, "id": target}
        )


@pytest.mark.parametrize(("a", "b"), [(2, 3), (1, 6), (0, 1)])
def test_reordered_events_are_located(env: AppEnv, a: int, b: int) -> None:
    ids = _ids()
    _tamper(lambda c: _swap(c, ids[a], ids[b]))
    # The earlier position now holds an event whose predecessor is not the one before it.
    _assert_broken_at(env, ids[a], "prev_hash does not match")


def test_concurrent_writers_on_postgres_fill_several_chains_and_stay_intact(
    env: AppEnv,
) -> None:
    """Writers whose transactions overlap append to different chains (a lone writer
    keeps to chain 0); every chain verifies, and a change in any chain is located."""
    import threading
    import time

    from app.audit import service as audit
    from app.core.db import session_scope
    from tests.support.database import postgres_admin_url

    if postgres_admin_url() is None:
        pytest.skip("needs PostgreSQL: PALIMPSEST_TEST_POSTGRES_URL is unset")
    # The shared env is on PostgreSQL here, holding the N_EVENTS seeded events.
    barrier = threading.Barrier(6)

    def writer(w: int) -> None:
        for i in range(10):
            barrier.wait(timeout=30)  # every round, all six transactions overlap
            with session_scope() as s:
                for part in range(2):  # two events, one transaction, one chain
                    audit.record(
                        s,
                        actor=f"key:w{w}",
                        action="request.received",
                        entity_type="deletion_request",
                        entity_id=f"w{w}-{i}-{part}",
                        data={"i": i},
                    )
                time.sleep(0.02)  # hold the chain until commit, as a request does

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    with env_connection() as conn:
        rows = conn.execute(
            text(
                "SELECT id, chain, entity_id FROM audit_events"
                " WHERE entity_id LIKE 'w%' ORDER BY id"
            )
        ).all()
    assert len(rows) == 120
    chains = {c for _, c, _ in rows}
    assert len(chains) > 1, chains
    by_entity: dict[str, set[int]] = {}
    for _, c, e in rows:
        by_entity.setdefault(e.rsplit("-", 1)[0], set()).add(c)
    assert all(len(cs) == 1 for cs in by_entity.values())  # one transaction, one chain
    check = _check()
    assert check.intact and check.events == 120 + N_EVENTS, check

    victim = next(i for i, c, _ in rows if c != 0)
    _tamper(
        lambda c: c.execute(
            text("UPDATE audit_events SET actor = 'key:mallory' WHERE id = :i"), {"i": victim}
        )
    )
    _assert_broken_at(env, victim, "event content does not match its hash")


def env_connection() -> Any:
    from app.core.db import get_engine

    return get_engine().connect()
