"""Deletion request intake: deadlines, idempotency, portal isolation, cancel, extend."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Any

import pytest

from app.core.db import session_scope
from app.requests import lifecycle
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, make_csv, make_rows, upload_dataset

ROWS = make_rows(n_subjects=30, rows_per_subject=2, seed=11, subject_prefix="dr")


@pytest.fixture(scope="module")
def dataset(env: AppEnv, keys: dict[str, str]) -> dict[str, Any]:
    return upload_dataset(env.client, keys["admin"], "requests-ds", make_csv(ROWS))


def subject(i: int) -> str:
    return f"dr-{i:04d}"


def create(env: AppEnv, key: str, body: dict[str, Any], **headers: str) -> Any:
    return env.client.post("/v1/deletion-requests", headers={**auth(key), **headers}, json=body)


def accepted(env: AppEnv, key: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    resp = create(env, key, body, **headers)
    assert resp.status_code == 202, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_intake_sets_a_thirty_day_deadline(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    body = accepted(env, keys["portal"], {"kind": "subject", "subject_id": subject(0)})
    assert set(body) >= {"id", "status", "received_at", "due_at"}
    assert body["status"] == "received"
    received = datetime.fromisoformat(body["received_at"])
    due = datetime.fromisoformat(body["due_at"])
    assert received.tzinfo is not None
    assert due - received == timedelta(days=30)

    view = env.client.get(f"/v1/deletion-requests/{body['id']}", headers=auth(keys["portal"]))
    assert view.status_code == 200
    got = view.json()
    assert got["id"] == body["id"] and got["kind"] == "subject"
    assert got["status"] == "received" and got["completed_at"] is None
    assert datetime.fromisoformat(got["due_at"]) == due
    assert isinstance(got["models"], list)
    # A portal is not told how much of the person the service holds; an admin is.
    assert got["n_records"] is None and got["data_held"] is None
    with session_scope() as s:
        lifecycle.plan(s, body["id"])
    seen = env.client.get(f"/v1/deletion-requests/{body['id']}", headers=auth(keys["admin"]))
    assert seen.json()["n_records"] == 2 and seen.json()["data_held"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "source", "source": "clinic-a"},
        {"kind": "records", "record_ids": ["0", "1"]},
    ],
    ids=["source", "records"],
)
def test_other_kinds_are_accepted(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any], body: dict[str, Any]
) -> None:
    assert accepted(env, keys["admin"], body)["status"] == "received"


def test_idempotency_key_replays_the_same_request(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    body = {"kind": "subject", "subject_id": subject(1)}
    first = create(env, keys["portal"], body, **{"Idempotency-Key": "retry-1"})
    again = create(env, keys["portal"], body, **{"Idempotency-Key": "retry-1"})
    assert first.status_code == 202
    assert again.status_code in (200, 202)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    # Another key, or another portal with the same header, makes a new request.
    other = create(env, keys["portal"], body, **{"Idempotency-Key": "retry-2"})
    assert other.json()["id"] != first.json()["id"]
    theirs = create(env, keys["portal_b"], body, **{"Idempotency-Key": "retry-1"})
    assert theirs.json()["id"] != first.json()["id"]
    # The same key with a different body is a client bug, not a retry: 409, nothing new.
    changed = create(
        env, keys["portal"], body | {"reason": "changed"}, **{"Idempotency-Key": "retry-1"}
    )
    assert_error(changed, 409, "idempotency_key_reused")
    again = create(env, keys["portal"], body, **{"Idempotency-Key": "retry-1"})
    assert again.json()["id"] == first.json()["id"]


@pytest.mark.parametrize("value", ["", "x" * 201])
def test_bad_idempotency_key_is_400(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any], value: str
) -> None:
    resp = create(
        env,
        keys["portal"],
        {"kind": "subject", "subject_id": subject(2)},
        **{"Idempotency-Key": value},
    )
    assert_error(resp, 400)


def test_portals_see_only_their_own_requests(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    mine = accepted(env, keys["portal"], {"kind": "subject", "subject_id": subject(3)})
    url = f"/v1/deletion-requests/{mine['id']}"
    assert_error(env.client.get(url, headers=auth(keys["portal_b"])), 404, "request_not_found")
    assert_error(env.client.post(f"{url}/cancel", headers=auth(keys["portal_b"])), 404)
    assert_error(env.client.get(f"{url}/certificate", headers=auth(keys["portal_b"])), 404)
    listed = env.client.get("/v1/deletion-requests?limit=200", headers=auth(keys["portal_b"]))
    assert mine["id"] not in {r["id"] for r in listed.json()["items"]}
    # Auditors and admins see everything.
    for role in ("auditor", "admin"):
        assert env.client.get(url, headers=auth(keys[role])).status_code == 200


def test_cancel_once(env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]) -> None:
    req = accepted(env, keys["portal"], {"kind": "subject", "subject_id": subject(4)})
    url = f"/v1/deletion-requests/{req['id']}/cancel"
    first = env.client.post(url, headers=auth(keys["portal"]))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled"
    assert_error(env.client.post(url, headers=auth(keys["portal"])), 409, "not_cancellable")
    # A closed request cannot be extended either.
    ext = env.client.post(
        f"/v1/deletion-requests/{req['id']}/extend",
        headers=auth(keys["admin"]),
        json={"reason": "complex case"},
    )
    assert_error(ext, 409)


def test_extend_once(env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]) -> None:
    req = accepted(env, keys["portal"], {"kind": "subject", "subject_id": subject(5)})
    url = f"/v1/deletion-requests/{req['id']}/extend"
    h = auth(keys["admin"])
    assert_error(env.client.post(url, headers=h, json={"reason": "x" * 3, "days": 62}), 422)
    assert_error(env.client.post(url, headers=h, json={}), 422)
    first = env.client.post(url, headers=h, json={"reason": "many systems involved"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["extended"] is True
    due = datetime.fromisoformat(body["due_at"])
    assert due - datetime.fromisoformat(req["due_at"]) == timedelta(days=61)
    again = env.client.post(url, headers=h, json={"reason": "still more time"})
    assert_error(again, 409, "already_extended")


# -- refused intake ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"kind": "subject"}, 422, None),
        ({"kind": "subject", "subject_id": ""}, 422, None),
        ({"kind": "subject", "subject_id": "   "}, 422, None),
        ({"kind": "erase-everything", "subject_id": "dr-0001"}, 422, None),
        ({"kind": "subject", "subject_id": "dr-0001", "source": "clinic-a"}, 422, None),
        ({"kind": "records", "record_ids": []}, 422, None),
        ({"kind": "subject", "subject_id": "dr-0001", "dataset_id": "x"}, 422, None),
    ],
)
def test_refused_intake(
    env: AppEnv,
    keys: dict[str, str],
    dataset: dict[str, Any],
    body: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    assert_error(create(env, keys["portal"], body), status, code)


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "subject", "subject_id": "no-such-person"},
        {"kind": "source", "source": "no-such-source"},
        {"kind": "records", "record_ids": ["no-such-record", "nor-this-one"]},
    ],
)
def test_a_target_not_held_is_accepted_like_any_other(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any], body: dict[str, Any]
) -> None:
    """No existence oracle: the answer to a portal is the same whether or not the service
    holds the person, records or source; only admins see that nothing was held."""
    held = create(env, keys["portal"], {"kind": "subject", "subject_id": subject(3)})
    unheld = create(env, keys["portal"], body)
    assert held.status_code == unheld.status_code == 202
    assert set(held.json()) == set(unheld.json())
    assert unheld.json()["status"] == held.json()["status"] == "received"
    rid = unheld.json()["id"]
    portal_view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(keys["portal"]))
    held_view = env.client.get(
        f"/v1/deletion-requests/{held.json()['id']}", headers=auth(keys["portal"])
    )
    assert set(portal_view.json()) == set(held_view.json())
    assert portal_view.json()["n_records"] is None and portal_view.json()["data_held"] is None
    admin_view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(keys["admin"]))
    assert admin_view.json()["data_held"] is None  # not known before planning
    with session_scope() as s:
        lifecycle.plan(s, rid)
    admin_view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(keys["admin"]))
    assert admin_view.json()["n_records"] == 0 and admin_view.json()["data_held"] is False


def test_feature_requests_are_admin_only(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    body = {"kind": "feature", "feature": "age", "model": "some-model"}
    assert_error(create(env, keys["portal"], body), 403, "forbidden")


def test_unknown_request_is_404(env: AppEnv, keys: dict[str, str]) -> None:
    resp = env.client.get("/v1/deletion-requests/nope", headers=auth(keys["admin"]))
    assert_error(resp, 404, "request_not_found")


# -- listing ----------------------------------------------------------------------------


def test_list_pages_with_a_cursor(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    made = {
        accepted(env, keys["portal_b"], {"kind": "subject", "subject_id": subject(i)})["id"]
        for i in range(10, 15)
    }
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        q = "/v1/deletion-requests?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = env.client.get(q, headers=auth(keys["portal_b"]))
        assert page.status_code == 200, page.text
        seen += [r["id"] for r in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert made <= set(seen)
    assert len(seen) == len(set(seen))


def test_list_filters_by_status(env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]) -> None:
    page = env.client.get("/v1/deletion-requests?status=cancelled", headers=auth(keys["admin"]))
    assert page.status_code == 200
    assert all(r["status"] == "cancelled" for r in page.json()["items"])


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "status=",
        "limit=0",
        "limit=-1",
        "limit=100000000000000000000",
        "limit=ten",
        "cursor=%%%",
        "cursor=" + "A" * 600,
        "cursor=" + _b64("no separator"),
        "cursor=" + _b64("not-a-date|abc"),
        "cursor=" + _b64("2024-01-01T00:00:00+00:00|abc").replace("=", ""),
        pytest.param("cursor=" + _b64("2024-01-01T00:00:00|abc"), id="naive-cursor"),
    ],
)
def test_bad_list_queries_are_4xx(env: AppEnv, keys: dict[str, str], query: str) -> None:
    assert_error(env.client.get(f"/v1/deletion-requests?{query}", headers=auth(keys["admin"])))
