"""Forgetting words from a text model (a feature request with `tokens`): the tokenizer
drops them, the model is corrected (every SISA shard retrained exactly; a monolithic
model repaired), and the feature check scores every test row with the words inserted
and removed: exactly equal. The same check fails on a model that was not corrected."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from app.core import outbox
from app.ml.data import TabularData
from app.ml.sisa import SisaEnsemble
from app.pipeline import fanout, features
from app.requests.lifecycle import EVENTS
from app.verification.media import token_check
from tests.media import gen
from tests.media.test_flow import SMALL, finish
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, create_model, post_dataset

WORDS = ["driving", "licence"]


class InlineChord:
    """Runs a chord's shard tasks and callback in this process, as workers would."""

    def send(self, task: outbox.PendingTask) -> None:
        pass

    def chord(self, header: Sequence[outbox.PendingTask], callback: outbox.PendingTask) -> None:
        results = [fanout.train_one_shard(*t.args) for t in header]
        job_id, attempt = callback.args
        fanout.finish_chord(job_id, results, EVENTS, attempt)


@pytest.fixture
def inline_chords() -> Iterator[None]:
    previous = outbox.sender()
    outbox.register_sender(InlineChord())
    try:
        yield
    finally:
        outbox.register_sender(previous)


def cv_rows(n: int = 60, seed: int = 3, prefix: str = "") -> list[dict[str, Any]]:
    """CVs where the licence words go with the label, so a model learns them."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        good = bool(rng.integers(0, 2))
        licence = good if rng.random() < 0.8 else not good
        out.append(
            {
                "subject": f"{prefix}c{s:03d}",
                "source": f"agency{s % 2}",
                "group": "licence" if licence else "none",
                "age": float(rng.integers(20, 60)),
                "label": "yes" if good else "no",
                "media": gen.cv_text(rng, good, licence),
            }
        )
    return out


def _text_model(env: AppEnv, admin: str, name: str, unlearning: dict[str, Any]) -> None:
    resp = post_dataset(
        env.client,
        admin,
        gen.parquet_bytes(cv_rows(prefix=name)),
        gen.spec(name, "text"),
        "cvs.parquet",
    )
    assert resp.status_code == 201, resp.text
    create_model(
        env.client,
        admin,
        resp.json()["id"],
        name=name,
        architecture={"kind": "mlp", "hidden": [8], "encoders": {"media": SMALL["text"]}},
        training={"epochs": 4, "batch_size": 16},
        unlearning=unlearning,
    )


def _forget_words(env: AppEnv, admin: str, name: str) -> dict[str, Any]:
    from app.core.db import session_scope
    from app.requests import lifecycle

    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={
            "kind": "feature",
            "feature": "media",
            "model": name,
            "tokens": ["Driving", "licence"],
        },
    )
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    features.run_feature(view["models"][0]["job_id"], EVENTS)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    return finish(env, admin, view)


@pytest.mark.parametrize(
    "unlearning",
    [
        {"mode": "sisa", "shards": 2, "slices": 2},
        {"mode": "sisa", "shards": 2, "slices": 2, "sharding": "source"},
        {"mode": "monolithic"},
    ],
    ids=["sisa-subject", "sisa-source", "monolithic"],
)
def test_forgotten_words_change_no_score(
    env: AppEnv, keys: dict[str, str], inline_chords: None, unlearning: dict[str, Any]
) -> None:
    admin = keys["admin"]
    name = f"cv-{unlearning['mode']}-{unlearning.get('sharding', 'subject')}"
    _text_model(env, admin, name, unlearning)
    view = _forget_words(env, admin, name)
    assert view["status"] == "completed", view
    assert view["tokens"] == ["driving", "licence"]
    (m,) = view["models"]
    assert m["to_version"] == 2
    assert m["method"] == ("feature_retrain" if unlearning["mode"] == "sisa" else "tokens_repair")
    report = env.client.get(f"/v1/reports/{m['report_id']}", headers=auth(admin)).json()
    check = report["checks"]["feature"]
    assert check["passed"] and check["metrics"]["after"]["max_abs_change"] == 0.0, check
    # Before the correction the words did move scores (the check can fail).
    assert check["metrics"]["before"]["max_abs_change"] > 0.0, check
    assert check["metrics"]["tokens"] == WORDS
    # The column is still a feature: texts keep scoring, the words do not count.
    texts = ["python sql welding", "python sql welding Driving LICENCE"]
    got = env.client.post(
        f"/v1/models/{name}/predict",
        headers=auth(admin),
        json={"records": [{"age": 30.0, "group": "none", "media": t} for t in texts]},
    )
    assert got.status_code == 200, got.text
    a, b = got.json()["predictions"]
    assert a == b


def test_the_check_fails_for_an_uncorrected_model(env: AppEnv, keys: dict[str, str]) -> None:
    """The production model, before any request: its scores move with the words."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.core.storage import get_store
    from app.models import MLModel, ModelVersion
    from app.registry import artifacts

    admin = keys["admin"]
    _text_model(env, admin, "cv-uncorrected", {"mode": "sisa", "shards": 2, "slices": 2})
    with session_scope() as s:
        model = s.scalars(select(MLModel).where(MLModel.name == "cv-uncorrected")).one()
        mv = s.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id)).one()
        manifest = artifacts.load_manifest(get_store(), mv.manifest_path)
        ckpt = artifacts.checkpoint_store(get_store(), model.id)
    import torch

    ensemble = SisaEnsemble.load(manifest, ckpt, torch.device("cpu"))
    rows = cv_rows(n=20, seed=9)
    cells = np.empty(len(rows), dtype=object)
    cells[:] = [r["media"] for r in rows]
    test = TabularData(
        record_ids=np.arange(len(rows), dtype=np.int64),
        columns={
            "age": np.array([r["age"] for r in rows]),
            "group": np.array([r["group"] for r in rows], dtype=object),
            "media": cells,
        },
        labels=np.zeros(len(rows), dtype=np.int64),
    )
    check = token_check(ensemble, None, test, "media", WORDS)
    assert not check.passed
    assert check.metrics["after"]["max_abs_change"] > 0.0


def test_tokens_need_a_text_column(env: AppEnv, keys: dict[str, str]) -> None:
    admin = keys["admin"]
    _text_model(env, admin, "cv-bad-tokens", {"mode": "sisa", "shards": 2, "slices": 2})
    for body, code in (
        ({"feature": "age", "tokens": ["x"]}, "not_a_text_column"),
        ({"feature": "media", "tokens": ["two words"]}, None),
    ):
        resp = env.client.post(
            "/v1/deletion-requests",
            headers=auth(admin),
            json={"kind": "feature", "model": "cv-bad-tokens", **body},
        )
        assert_error(resp, 422, code)


def test_a_text_column_without_tokens_is_removed_whole(
    env: AppEnv, keys: dict[str, str], inline_chords: None
) -> None:
    admin = keys["admin"]
    _text_model(env, admin, "cv-drop-column", {"mode": "sisa", "shards": 2, "slices": 2})
    from app.core.db import session_scope
    from app.requests import lifecycle

    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "feature", "feature": "media", "model": "cv-drop-column"},
    )
    rid = r.json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    features.run_feature(view["models"][0]["job_id"], EVENTS)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    view = finish(env, admin, view)
    assert view["status"] == "completed", view
    report = env.client.get(
        f"/v1/reports/{view['models'][0]['report_id']}", headers=auth(admin)
    ).json()
    check = report["checks"]["feature"]
    assert check["passed"] and check["metrics"]["after"]["max_abs_change"] == 0.0, check
    assert check["metrics"]["before"]["max_abs_change"] > 0.0


def test_the_model_page_shows_column_kinds_encoders_and_forgotten_words(
    env: AppEnv, keys: dict[str, str], inline_chords: None
) -> None:
    from tests.dashboard.helpers import login

    admin = keys["admin"]
    _text_model(env, admin, "cv-page", {"mode": "sisa", "shards": 2, "slices": 2})
    _forget_words(env, admin, "cv-page")
    page = login(env, admin).get("/admin/models/cv-page")
    assert page.status_code == 200, page.text
    html = page.text
    assert 'data-testid="inputs"' in html
    row = html[html.index('data-column="media"') :].split("</tr>")[0]
    assert "text" in row and "text_bag" in row and "buckets=1024" in row
    assert "driving, licence" in row
    age = html[html.index('data-column="age"') :].split("</tr>")[0]
    assert "numeric" in age


@pytest.mark.parametrize("feature", ["media", "age"])
def test_monolithic_media_model_drops_a_column(
    env: AppEnv, keys: dict[str, str], feature: str
) -> None:
    """Zero-freeze-repair on a media model: a text column (its encoder's outputs in the
    head) or a tabular one (its head column after the encodings)."""
    from app.core.db import session_scope
    from app.requests import lifecycle

    admin = keys["admin"]
    name = f"cv-mono-drop-{feature}"
    _text_model(env, admin, name, {"mode": "monolithic"})
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "feature", "feature": feature, "model": name},
    )
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    view = env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    features.run_feature(view["models"][0]["job_id"], EVENTS)
    view = finish(
        env, admin, env.client.get(f"/v1/deletion-requests/{rid}", headers=auth(admin)).json()
    )
    assert view["status"] == "completed", view
    (m,) = view["models"]
    assert m["method"] == "feature_repair", m
    check = env.client.get(f"/v1/reports/{m['report_id']}", headers=auth(admin)).json()["checks"][
        "feature"
    ]
    assert check["passed"] and check["metrics"]["after"]["max_abs_change"] == 0.0, check
