"""A target the service does not hold completes with nothing to erase, and its signed
certificate says no data was held (the intake answer revealed nothing)."""

from __future__ import annotations

from app.core.db import session_scope
from app.core.storage import get_store
from app.requests import lifecycle
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset


def test_an_unheld_subject_completes_with_a_certificate_saying_nothing_was_held(
    env: AppEnv,
) -> None:
    admin, portal = create_key("admin"), create_key("portal")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=20))
    create_model(env.client, admin, ds["id"])
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(portal),
        json={"kind": "subject", "subject_id": "never-seen", "external_ref": "case-9"},
    )
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(portal)).json()
    assert view["status"] == "erasing" and view["models"] == []
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(portal)).json()
    assert view["status"] == "completed"
    cert = env.client.get(f"/v1/deletion-requests/{rid}/certificate", headers=auth(portal))
    assert cert.status_code == 200, cert.text
    erasure = cert.json()["certificate"]["erasure"]
    assert erasure["data_held"] is False and erasure["records_erased"] == 0
    assert "nothing had to be erased" in erasure["statement"]
    assert cert.json()["certificate"]["models"] == []
