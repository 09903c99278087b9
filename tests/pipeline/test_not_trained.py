"""A request whose records lie only in a model's test split reached the model without
training it: the request lists the model as `not_trained`, completes, and its
certificate says so."""

from __future__ import annotations

from app.core.db import session_scope
from app.core.storage import get_store
from app.requests import lifecycle
from tests.pipeline.test_outputs import _request, _subject_with
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset


def test_a_request_on_test_rows_only_lists_the_model_as_not_trained(env: AppEnv) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=60, rows_per_subject=2))
    create_model(env.client, admin, ds["id"], unlearning={"mode": "sisa", "shards": 3, "slices": 2})
    rid = _request(env, admin, _subject_with("test"))
    with session_scope() as s:
        lifecycle.plan(s, rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    assert view["status"] == "erasing", view
    (m,) = view["models"]
    assert m["status"] == "not_trained" and m["job_id"] is None, m
    assert m["from_version"] == m["to_version"] == 1
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    assert view["status"] == "completed", view
    assert [x["status"] for x in view["models"]] == ["not_trained"]
    cert = env.client.get(f"/v1/deletion-requests/{rid}/certificate", headers=auth(admin))
    assert cert.status_code == 200, cert.text
    (entry,) = cert.json()["certificate"]["models"]
    assert entry["status"] == "not_trained" and "test" in entry["statement"]
