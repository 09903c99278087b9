"""A large CSV with a text column goes to the worker's `ingest` job like any other (its
task body run in-process here) and comes out with the same column kinds; a model reads
its text. Archives and image/audio columns are ingested inline whatever their size."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest

from app.core.settings import get_settings
from app.pipeline import ingest
from tests.media import gen
from tests.media.test_flow import SMALL
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_model, post_dataset


@pytest.fixture
def small_inline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PALIMPSEST_INLINE_INGEST_BYTES", "1024")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _csv(recs: list[dict[str, object]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["subject", "source", "group", "age", "label", "media"])
    w.writeheader()
    for r in recs:
        w.writerow({k: r[k] for k in w.fieldnames})
    return buf.getvalue().encode()


def test_a_large_text_csv_is_ingested_by_the_job(
    env: AppEnv, keys: dict[str, str], small_inline: None
) -> None:
    admin = keys["admin"]
    recs = gen.rows("text", n_subjects=30, seed=8, prefix="staged-")
    resp = post_dataset(env.client, admin, _csv(recs), gen.spec("staged-text", "text"), "cvs.csv")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    ingest.run_ingest(body["job_id"])
    ds = env.client.get(f"/v1/datasets/{body['id']}", headers=auth(admin)).json()
    assert ds["status"] == "ready", ds
    assert ds["column_kinds"] == {"group": "categorical", "age": "numeric", "media": "text"}
    create_model(
        env.client,
        admin,
        ds["id"],
        name="staged-text",
        architecture={"kind": "mlp", "hidden": [4], "encoders": {"media": SMALL["text"]}},
    )
    model = env.client.get("/v1/models/staged-text", headers=auth(admin)).json()
    assert model["production_version"] == 1, model


def test_a_large_archive_is_ingested_inline(
    env: AppEnv, keys: dict[str, str], small_inline: None
) -> None:
    recs = gen.rows("image", n_subjects=8, seed=8, prefix="inline-")
    resp = post_dataset(
        env.client,
        keys["admin"],
        gen.zip_bytes(recs, "image"),
        gen.spec("inline-img", "image"),
        "d.zip",
    )
    assert resp.status_code == 201, resp.text
