"""Media models through the API (worker task bodies run in-process): train a SISA
model on a zip of text, images or audio, predict with strings and base64, erase a
subject, and find none of its media anywhere under the artifact root afterwards."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from app.core.db import session_scope
from app.core.storage import get_store
from app.requests import lifecycle
from tests.integration.test_no_resurrection import blob_hits
from tests.media import gen
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, create_model, plan_and_run, post_dataset

SMALL = {
    "text": {"buckets": 1024, "dim": 8},
    "image": {"size": 16, "width": 4},
    "audio": {"n_mels": 16, "seconds": 0.5, "width": 4},
}


def _scan(root: Path, texts: list[str], blobs: list[bytes]) -> list[str]:
    hits = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        hits += blob_hits(str(f.relative_to(root)), f.read_bytes(), texts, [], blobs)
    return hits


def finish(env: AppEnv, admin: str, view: dict[str, Any]) -> dict[str, Any]:
    """The erasure step (its own task in a worker), run in-process."""
    if view["status"] == "erasing":
        with session_scope() as s:
            lifecycle.erase(s, get_store(), view["id"])
        view = env.client.get(f"/v1/deletion-requests/{view['id']}", headers=auth(admin)).json()
    return view


def _wire(kind: str, value: object) -> object:
    return value if kind == "text" else base64.b64encode(value).decode()  # type: ignore[arg-type]


@pytest.mark.parametrize("sharding", ["subject", "source", "random"])
@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_train_predict_erase(env: AppEnv, keys: dict[str, str], kind: str, sharding: str) -> None:
    admin = keys["admin"]
    recs = gen.rows(kind, n_subjects=16, seed=7)
    name = f"{kind}-{sharding}"
    resp = post_dataset(env.client, admin, gen.zip_bytes(recs, kind), gen.spec(name, kind), "d.zip")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    create_model(
        env.client,
        admin,
        ds["id"],
        name=name,
        architecture={"kind": "mlp", "hidden": [8], "encoders": {"media": SMALL[kind]}},
        unlearning={"mode": "sisa", "shards": 2, "slices": 2, "sharding": sharding},
    )
    model = env.client.get(f"/v1/models/{name}", headers=auth(admin)).json()
    assert model["production_version"] == 1, model

    # Predict: text as strings, media as base64 of the file's bytes.
    records = [
        {"age": r["age"], "group": r["group"], "media": _wire(kind, r["media"])} for r in recs[:3]
    ]
    got = env.client.post(
        f"/v1/models/{name}/predict", headers=auth(admin), json={"records": records}
    )
    assert got.status_code == 200, got.text
    assert len(got.json()["predictions"]) == 3
    if kind != "text":
        for bad in ("not base64!", base64.b64encode(b"garbage bytes").decode()):
            resp = env.client.post(
                f"/v1/models/{name}/predict",
                headers=auth(admin),
                json={"records": [{**records[0], "media": bad}]},
            )
            assert_error(resp, 422, "invalid_media")

    # Erase one subject: its media bytes leave every file under the artifact root.
    target = "s003"
    mine = [r["media"] for r in recs if r["subject"] == target]
    texts = mine if kind == "text" else []
    blobs = [] if kind == "text" else mine
    before = _scan(env.artifact_root, texts, blobs)  # the scan can find them
    assert before, "the scan found nothing before erasure"
    req = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": target},
    )
    assert req.status_code == 202, req.text
    view = finish(env, admin, plan_and_run(env.client, admin, req.json()["id"]))
    assert view["status"] == "completed", view
    (m,) = view["models"]
    assert m["method"] == "sisa", m
    assert _scan(env.artifact_root, texts, blobs) == []
    after = env.client.get(f"/v1/datasets/{ds['id']}", headers=auth(admin)).json()
    assert after["n_records"] == len(recs) - len(mine)
