"""Against a real Fides (ethyca-fides from PyPI, webserver + worker): an operator uploads
the connector in `integrations/fides/`, connects it to a real Palimpsest (API + worker,
PostgreSQL + Redis), and files two erasure privacy requests: one for a subject Palimpsest
holds, one for an email it has never seen. Both Fides requests reach `complete` through
the asynchronous callback; Palimpsest unlearns and erases the first and records that the
second held nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import LocalStack
from tests.integration.conftest import _drop_postgres_database, _postgres_database, _reachable
from tests.integration.conftest import _unavailable as unavailable
from tests.integration.flows import ingest, make_csv, train, wait_for
from tests.support.fides import (
    FIDES_VERSION,
    connector_zip,
    fides_venv,
    privacy_request,
    running_fides,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
HELD = "p0007@example.org"
UNHELD = f"nobody-{uuid.uuid4().hex[:8]}@example.org"
# A JWE in compact form (what Fides's reply-to-token is): five base64url parts.
JWE = re.compile(r"eyJ[\w-]+\.[\w-]*\.[\w-]+\.[\w-]+\.[\w-]+")


def _services() -> tuple[str, str]:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", "")
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", "")
    if not pg or not _reachable(pg, 5432):
        unavailable(f"PostgreSQL not reachable at {pg or '(PALIMPSEST_TEST_POSTGRES_URL unset)'}")
    if not redis_url or not _reachable(redis_url, 6379):
        unavailable(f"Redis not reachable at {redis_url or '(PALIMPSEST_TEST_REDIS_URL unset)'}")
    return pg, redis_url


@pytest.fixture(scope="session")
def fides_install() -> Path:
    """ethyca-fides in its cached venv; the first run installs it from PyPI (minutes)."""
    _services()
    try:
        venv, seconds = fides_venv()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        unavailable(f"could not install ethyca-fides {FIDES_VERSION}: {exc}")
    if seconds:
        print(f"\ninstalled ethyca-fides {FIDES_VERSION} in {seconds:.0f} s into {venv}")
    return venv


@pytest.fixture
def palimpsest(fides_install: Path, tmp_path: Path) -> Iterator[tuple[LocalStack, int]]:
    pg, redis_url = _services()
    name = _postgres_database(pg)
    db_index = 1 + uuid.uuid4().int % 15
    env = {
        "PALIMPSEST_DEVICE": "cpu",
        "PALIMPSEST_TORCH_THREADS": "1",
        "PALIMPSEST_DATABASE_URL": f"{pg.rsplit('/', 1)[0]}/{name}",
        # A server database is production: it refuses to start without secrets.
        "PALIMPSEST_SUBJECT_PEPPER": f"test-pepper-{uuid.uuid4().hex}",
        "PALIMPSEST_DASHBOARD_SESSION_SECRET": f"test-session-{uuid.uuid4().hex}",
        "PALIMPSEST_BROKER_URL": f"{redis_url.rstrip('/')}/{db_index}",
        "PALIMPSEST_RESULT_BACKEND": f"{redis_url.rstrip('/')}/{db_index}",
        # Fides runs on 127.0.0.1 here: the operator allows that network for callbacks.
        "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    st = LocalStack(tmp_path / "palimpsest", env=env)
    try:
        st.start()
        yield st, db_index
    finally:
        st.stop()
        _drop_postgres_database(pg, name)


def _email_csv() -> bytes:
    """make_csv's people, each known by an email address (the subject column)."""
    rows = list(csv.reader(io.StringIO(make_csv(n_subjects=80, per_subject=4, seed=3).decode())))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    for row in rows[1:]:
        writer.writerow([f"{row[0]}@example.org", *row[1:]])
    return out.getvalue().encode()


def _plain_http(config_zip: bytes) -> bytes:
    """The shipped connector speaks https; this Palimpsest serves plain HTTP on loopback,
    so the upload changes that one line, as docs/fides.md tells such an operator to."""
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(config_zip))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_config.yml"):
                text = data.decode()
                assert text.count("protocol: https") == 1
                data = text.replace("protocol: https", "protocol: http").encode()
            dst.writestr(info.filename, data)
    return buf.getvalue()


def _erasure_policy(fides: httpx.Client) -> str:
    key = "palimpsest_erasure"
    r = fides.patch("/dsr/policy", json=[{"name": "Erasure via Palimpsest", "key": key}])
    assert r.status_code == 200 and not r.json()["failed"], r.text
    rule = {
        "name": "Erase contact data",
        "key": "erase_contact",
        "action_type": "erasure",
        "masking_strategy": {"strategy": "null_rewrite", "configuration": {}},
    }
    r = fides.patch(f"/dsr/policy/{key}/rule", json=[rule])
    assert r.status_code == 200 and not r.json()["failed"], r.text
    target = {"name": "email", "key": "email", "data_category": "user.contact.email"}
    r = fides.patch(f"/dsr/policy/{key}/rule/erase_contact/target", json=[target])
    assert r.status_code == 200 and not r.json()["failed"], r.text
    return key


def _submit(fides: httpx.Client, policy: str, email: str) -> str:
    r = fides.post("/privacy-request", json=[{"identity": {"email": email}, "policy_key": policy}])
    assert r.status_code == 200 and not r.json()["failed"], r.text
    return str(r.json()["succeeded"][0]["id"])


def _palimpsest_request(admin: httpx.Client, external_ref: str) -> dict[str, Any] | None:
    items = admin.get("/v1/deletion-requests", params={"limit": 50}).json()["items"]
    found = [i for i in items if i["external_ref"] == external_ref]
    return found[0] if found else None


def test_fides_erasure_reaches_palimpsest_models_and_completes_through_the_callback(
    fides_install: Path, palimpsest: tuple[LocalStack, int], tmp_path: Path
) -> None:
    stack, palimpsest_db = palimpsest
    pg, redis_url = _services()
    admin = httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('admin', 'ops')}"},
        timeout=30,
    )
    portal_key = stack.create_key("portal", "fides")
    ds = ingest(admin, "people", _email_csv())
    # `ingest` names the subject column "person": here it holds emails.
    assert ds["n_subjects"] == 80
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
    held = admin.get(f"/v1/subjects/{HELD}/lineage").json()
    assert held["records"] == 4, held

    fides_db = 1 + (palimpsest_db % 15)  # a Redis database of its own
    with running_fides(tmp_path / "fides", fides_install, pg, redis_url, fides_db) as server:
        fides = server.client()
        # The operator's steps (docs/fides.md): upload the connector, then add an
        # integration from it with Palimpsest's host, a portal key and Fides's own URL.
        r = fides.post(
            "/connector-templates/register",
            content=_plain_http(connector_zip()),
            headers={"Content-Type": "application/zip"},
        )
        assert r.status_code == 200, r.text
        r = fides.post(
            "/connection/instantiate/palimpsest",
            json={
                "name": "Palimpsest",
                "key": "palimpsest",
                "instance_key": "palimpsest",
                "secrets": {
                    "domain": stack.base_url.removeprefix("http://"),
                    "api_key": portal_key,
                    "fides_url": server.base_url,
                },
            },
        )
        assert r.status_code == 200, r.text
        r = fides.get("/connection/palimpsest/test")
        assert r.status_code == 200 and r.json()["test_status"] == "succeeded", r.text

        policy = _erasure_policy(fides)
        held_pr = _submit(fides, policy, HELD)
        unheld_pr = _submit(fides, policy, UNHELD)
        assert privacy_request(fides, held_pr)["status"] == "pending"
        r = fides.patch(
            "/privacy-request/administrate/approve", json={"request_ids": [held_pr, unheld_pr]}
        )
        assert r.status_code == 200 and not r.json()["failed"], r.text

        done = {
            pr: wait_for(
                lambda pr=pr: privacy_request(fides, pr),
                lambda p: p["status"] in ("complete", "error", "canceled", "denied"),
                timeout=600,
            )
            for pr in (held_pr, unheld_pr)
        }
        assert all(p["status"] == "complete" for p in done.values()), (
            json.dumps(done, default=str)[:3000] + "\n" + server.tail()
        )
        tasks = {
            pr: fides.get(f"/privacy-request/{pr}/tasks").json() for pr in (held_pr, unheld_pr)
        }
        logs = {
            pr: fides.get(f"/privacy-request/{pr}/log", params={"size": 100}).json()
            for pr in (held_pr, unheld_pr)
        }
        fides_logs = server.log_text()

    erasures = {
        pr: [
            t
            for t in ts
            if t["action_type"] == "erasure" and "palimpsest" in t["collection_address"]
        ]
        for pr, ts in tasks.items()
    }
    assert all(len(e) == 1 and e[0]["status"] == "complete" for e in erasures.values()), erasures
    # Fides's own activity log: the task waited for the callback, then took its count.
    for pr, count in ((held_pr, 4), (unheld_pr, 0)):
        entries = [
            (e["status"], e["message"])
            for e in logs[pr]["items"]
            if e["connection_key"] == "palimpsest" and e["action_type"] == "erasure"
        ]
        assert ("awaiting_processing", "Awaiting erasure callback results") in entries, entries
        assert entries[-1] == ("complete", f"success - masked {count} records"), entries
    assert "Callback received for erasure task" in fides_logs

    # Palimpsest: the held subject's request unlearned on the model, then erased the data.
    req = _palimpsest_request(admin, held_pr)
    assert req is not None and req["status"] == "completed", req
    assert req["n_records"] == 4
    assert [
        (m["model"], m["status"], m["from_version"], m["to_version"]) for m in req["models"]
    ] == [("small", "promoted", 1, 2)]
    assert req["callback"]["kind"] == "fides" and req["callback"]["status"] == "delivered", req
    assert req["callback"]["rows_masked"] == 4 and req["callback"]["attempts"] >= 1
    after = admin.get(f"/v1/subjects/{HELD}/lineage").json()
    assert after["records"] == 0, after
    assert admin.get(f"/v1/deletion-requests/{req['id']}/certificate").status_code == 200

    # The email nobody holds: accepted, completed with nothing erased, reported as 0 rows.
    none = _palimpsest_request(admin, unheld_pr)
    assert none is not None and none["status"] == "completed", none
    assert none["n_records"] == 0 and none["models"] == []
    assert none["callback"]["status"] == "delivered" and none["callback"]["rows_masked"] == 0
    audit = admin.get("/v1/audit", params={"limit": 500}).json()["items"]
    nothing_held = [
        e
        for e in audit
        if e["action"] == "integration.nothing_held" and e["entity_id"] == none["id"]
    ]
    assert len(nothing_held) == 1, [e["action"] for e in audit]
    delivered = {e["entity_id"] for e in audit if e["action"] == "integration.callback_delivered"}
    assert {req["id"], none["id"]} <= delivered

    # The reply-to token is a secret: never in a response, an audit event or a log line.
    views = json.dumps([req, none, audit])
    assert not JWE.search(views)
    palimpsest_logs = "\n".join(p.read_text(errors="replace") for p in stack.logs)
    assert not JWE.search(palimpsest_logs)
