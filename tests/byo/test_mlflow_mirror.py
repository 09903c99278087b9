"""The MLflow registry mirror against a real `mlflow server` (SQLite backend, started
once for this module): the `production` alias follows promotions and rollbacks, a purged
version is gone from MLflow, and an unreachable MLflow never blocks a promotion (the
sync is retried and visible in /metrics and the dashboard)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.core.settings import get_settings
from app.integrations import mlflow_mirror
from app.models import Job, MLModel, RegistryMirror
from app.models.base import utcnow
from app.pipeline import retraining
from app.requests.lifecycle import EVENTS
from tests.byo.conftest import free_port as _free_port
from tests.byo.flows import erase_subject
from tests.dashboard.helpers import login
from tests.support.app_env import AppEnv, app_env
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="mlflow is not installed (pip install -e '.[dev]' or 'palimpsest[mlflow]')",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> Iterator[AppEnv]:
    old = os.environ.get("PALIMPSEST_MLFLOW_TRACKING_URI")
    os.environ["PALIMPSEST_MLFLOW_TRACKING_URI"] = mlflow_uri
    try:
        with app_env(tmp_path_factory.mktemp("env")) as e:
            yield e
    finally:
        if old is None:
            os.environ.pop("PALIMPSEST_MLFLOW_TRACKING_URI", None)
        else:
            os.environ["PALIMPSEST_MLFLOW_TRACKING_URI"] = old
        get_settings.cache_clear()


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _model_id(name: str) -> str:
    with session_scope() as s:
        return str(s.scalars(select(MLModel.id).where(MLModel.name == name)).one())


def _sync(name: str) -> str:
    """What the worker's sync task does (the in-memory broker sends no task)."""
    return mlflow_mirror.sync(_model_id(name))


def _mirrored(uri: str, name: str) -> dict[int, Any]:
    return {
        int(mv.tags["palimpsest.version"]): mv
        for mv in _client(uri).search_model_versions(f"name='{name}'")
    }


def _alias_target(uri: str, name: str) -> int:
    mv = _client(uri).get_model_version_by_alias(name, "production")
    return int(mv.tags["palimpsest.version"])


def test_the_alias_follows_promotions_and_purged_versions_are_gone(
    env: AppEnv, mlflow_uri: str
) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "mirror", make_csv(n_subjects=30, rows_per_subject=3))
    create_model(
        env.client,
        admin,
        ds["id"],
        "churn",
        architecture={"kind": "gbdt", "max_iter": 5},
        unlearning={"mode": "sisa", "shards": 2},
    )
    assert _sync("churn") == "synced"
    assert _alias_target(mlflow_uri, "churn") == 1
    v1 = _mirrored(mlflow_uri, "churn")[1]
    assert v1.tags["palimpsest.method"] == "sisa" and v1.tags["palimpsest.requests"] == ""

    view = erase_subject(env.client, admin, "subj-0004")
    assert view["status"] == "completed", view
    assert _sync("churn") == "synced"
    mirrored = _mirrored(mlflow_uri, "churn")
    # Version 1 saw the erased subject: purged in Palimpsest, deleted from MLflow.
    assert set(mirrored) == {2}
    assert _alias_target(mlflow_uri, "churn") == 2
    assert mirrored[2].tags["palimpsest.requests"] == view["id"]
    assert mirrored[2].tags["palimpsest.method"] == "sisa"

    # A retrain on demand makes version 3; a rollback to 2 moves the alias back.
    job = env.client.post("/v1/models/churn/retrain", headers=auth(admin)).json()["job_id"]
    retraining.run_retrain(job, EVENTS)
    assert env.client.get("/v1/models/churn", headers=auth(admin)).json()["production_version"] == 3
    assert _sync("churn") == "synced"
    assert _alias_target(mlflow_uri, "churn") == 3
    r = env.client.post("/v1/models/churn/versions/2/promote", headers=auth(admin))
    assert r.status_code == 200, r.text
    assert _sync("churn") == "synced"
    assert _alias_target(mlflow_uri, "churn") == 2
    assert set(_mirrored(mlflow_uri, "churn")) == {2, 3}


def test_a_plugin_models_erasure_is_its_new_production_alias(env: AppEnv, mlflow_uri: str) -> None:
    """The issue's "done when": install a plugin, create a model with it, erase a
    subject, and see the new production version in Palimpsest and as MLflow's alias."""
    admin = create_key("admin")
    # Subjects of its own: an erasure reaches every dataset holding the subject.
    rows = make_csv(n_subjects=30, rows_per_subject=3, subject_prefix="plug")
    ds = upload_dataset(env.client, admin, "mirror-p", rows)
    arch = {"kind": "example-resmlp", "width": 8, "blocks": 1}
    create_model(env.client, admin, ds["id"], "plugged", architecture=arch)
    assert _sync("plugged") == "synced"
    view = erase_subject(env.client, admin, "plug-0005")
    assert view["status"] == "completed", view
    assert (
        env.client.get("/v1/models/plugged", headers=auth(admin)).json()["production_version"] == 2
    )
    assert _sync("plugged") == "synced"
    assert _alias_target(mlflow_uri, "plugged") == 2
    assert set(_mirrored(mlflow_uri, "plugged")) == {2}


def test_an_unreachable_mlflow_never_blocks_a_promotion(
    env: AppEnv, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = create_key("admin")
    ds = upload_dataset(
        env.client, admin, "mirror-down", make_csv(n_subjects=20, rows_per_subject=2)
    )
    monkeypatch.setenv("PALIMPSEST_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    get_settings.cache_clear()
    create_model(env.client, admin, ds["id"], "offline", architecture={"kind": "logreg"})
    view = env.client.get("/v1/models/offline", headers=auth(admin)).json()
    assert view["production_version"] == 1  # promoted all the same
    mid = _model_id("offline")
    assert _sync("offline") == "failing"
    with session_scope() as s:
        row = s.get(RegistryMirror, mid)
        assert row is not None and row.failures == 1 and row.last_error
        assert row.next_attempt_at is not None and row.next_attempt_at > utcnow()
    metrics = env.client.get("/metrics").text
    assert 'palimpsest_registry_mirrors{status="failing"} 1.0' in metrics
    page = login(env, admin).get("/admin/models/offline")
    assert page.status_code == 200 and "MLflow mirror" in page.text
    assert "Last attempt failed" in page.text
    # Not due yet: a duplicate task does nothing.
    assert _sync("offline") == "skipped"
    with session_scope() as s:
        assert s.get(RegistryMirror, mid).attempts == 1  # type: ignore[union-attr]

    # MLflow is back; the retry comes due (the beat's sweep sends it).
    monkeypatch.setenv("PALIMPSEST_MLFLOW_TRACKING_URI", mlflow_uri)
    get_settings.cache_clear()
    with session_scope() as s:
        row = s.get(RegistryMirror, mid)
        assert row is not None
        row.next_attempt_at = utcnow().replace(year=2000)
    assert mlflow_mirror.sweep() >= 1
    assert _sync("offline") == "synced"
    assert _alias_target(mlflow_uri, "offline") == 1
    with session_scope() as s:
        assert s.scalars(select(Job).where(Job.kind == "train")).first() is not None


def test_the_sync_task_and_its_sweep_are_registered_with_celery() -> None:
    from workers.celery_app import get_celery

    app = get_celery()
    app.loader.import_default_modules()
    assert {"palimpsest.sync_registry_mirror", "palimpsest.sweep_registry_mirrors"} <= set(
        app.tasks
    )
    sweeps = {e["task"] for e in app.conf.beat_schedule.values()}
    assert "palimpsest.sweep_registry_mirrors" in sweeps
