"""API keys: listed (never their secrets), created and revoked, by admins over the API
and by operators with `palimpsest keys`; a revoked key is refused at once, its
dashboard sessions included."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from app.stack import LocalStack
from tests.dashboard.helpers import login
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, create_key


def test_admin_creates_lists_and_revokes_keys(env: AppEnv, keys: dict[str, str]) -> None:
    h = auth(keys["admin"])
    r = env.client.post("/v1/keys", headers=h, json={"role": "auditor", "name": "kate"})
    assert r.status_code == 201, r.text
    made = r.json()
    raw = made["key"]
    assert raw.startswith("plm_") and made["prefix"] == raw[:10] and made["revoked_at"] is None
    assert env.client.get("/v1/audit", headers=auth(raw)).status_code == 200
    session = login(env, raw)  # an auditor's dashboard session
    assert session.get("/admin").status_code == 200

    listed = env.client.get("/v1/keys", headers=h)
    assert listed.status_code == 200
    items = {k["id"]: k for k in listed.json()["items"]}
    assert items[made["id"]]["name"] == "kate" and items[made["id"]]["role"] == "auditor"
    assert raw not in listed.text  # secrets never come back
    assert all(
        set(k) == {"id", "name", "role", "prefix", "created_at", "revoked_at"}
        for k in items.values()
    )

    r = env.client.post(f"/v1/keys/{made['id']}/revoke", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["revoked_at"] is not None
    # At once: the key's next call and its open dashboard session.
    assert_error(env.client.get("/v1/audit", headers=auth(raw)), 401, "unauthorized")
    page = session.get("/admin")
    assert page.status_code == 303 and page.headers["location"] == "/admin/login"
    assert_error(env.client.post(f"/v1/keys/{made['id']}/revoke", headers=h), 409, "key_revoked")
    assert_error(env.client.post("/v1/keys/nope/revoke", headers=h), 404, "key_not_found")
    live = env.client.get("/v1/keys", headers=h, params={"include_revoked": "false"}).json()
    assert made["id"] not in {k["id"] for k in live["items"]}
    actions = [e["action"] for e in env.client.get("/v1/audit", headers=h).json()["items"]]
    assert "api_key.revoked" in actions and "api_key.created" in actions


def test_keys_routes_are_admin_only(env: AppEnv, keys: dict[str, str]) -> None:
    for role in ("portal", "auditor"):
        h = auth(keys[role])
        assert_error(env.client.get("/v1/keys", headers=h), 403)
        assert_error(
            env.client.post("/v1/keys", headers=h, json={"role": "admin", "name": "x"}), 403
        )
    assert_error(env.client.get("/v1/keys"), 401)
    victim = create_key("portal", "victim")
    assert env.client.get("/v1/deletion-requests", headers=auth(victim)).status_code == 200
    for bad in ({"role": "root", "name": "x"}, {"role": "admin", "name": " "}, {"role": "admin"}):
        assert_error(env.client.post("/v1/keys", headers=auth(keys["admin"]), json=bad), 422)


def test_cli_lists_and_revokes_by_id_or_name(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    stack.cli("db", "upgrade")
    raw_a = stack.create_key("portal", "portal-a")
    stack.create_key("auditor", "twin")
    stack.create_key("auditor", "twin")
    out = stack.cli("keys", "list")
    lines = out.strip().splitlines()
    assert lines[0].split("\t") == ["id", "role", "name", "prefix", "created_at", "revoked_at"]
    rows = [line.split("\t") for line in lines[1:]]
    assert sorted(r[2] for r in rows) == ["portal-a", "twin", "twin"]
    assert raw_a not in out and all(r[5] == "-" for r in rows)

    revoked = stack.cli("keys", "revoke", "portal-a")
    assert "revoked portal key" in revoked
    # Two live keys share a name: refused, nothing revoked; the id picks one.
    with_name = _run(stack, "keys", "revoke", "twin")
    assert with_name.returncode == 2 and "give one of their ids" in with_name.stderr
    twin_id = next(r[0] for r in rows if r[2] == "twin")
    stack.cli("keys", "revoke", twin_id)
    again = _run(stack, "keys", "revoke", twin_id)
    assert again.returncode == 1 and "was revoked" in again.stderr
    assert _run(stack, "keys", "revoke", "nobody").returncode == 2

    with sqlite3.connect(tmp_path / "palimpsest.sqlite") as conn:
        state = dict(conn.execute("SELECT id, revoked_at IS NOT NULL FROM api_keys"))
    assert sum(state.values()) == 2 and state[twin_id] == 1
    live = stack.cli("keys", "list", "--live").strip().splitlines()[1:]
    assert [line.split("\t")[2] for line in live] == ["twin"]


def _run(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=stack.env,
        cwd=stack.folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
