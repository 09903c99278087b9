"""A monolithic model's reference models are cached: erasure deletes those that trained
on erased rows, and the next retrain (which trains on the retained data anyway) trains a
fresh set; a retrain with the set complete trains none."""

from __future__ import annotations

import json

from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import get_store
from app.jobs import routing
from app.models import Job, MLModel, ModelVersion
from app.pipeline import retraining
from app.registry import references
from app.requests import lifecycle
from tests.support.app_env import AppEnv
from tests.support.factories import (
    auth,
    create_key,
    create_model,
    make_csv,
    plan_and_run,
    upload_dataset,
)


def _retrain(model_id: str) -> dict:  # type: ignore[type-arg]
    with session_scope() as s:
        job_id = routing.create_retrain(s, model_id, "test").id
    retraining.run_retrain(job_id, lifecycle.EVENTS)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded", job and job.error
        return dict(job.result["unlearning"])


def test_references_are_rebuilt_by_a_retrain_only_when_erasure_took_some(env: AppEnv) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=40, rows_per_subject=3))
    create_model(
        env.client,
        admin,
        ds["id"],
        unlearning={"mode": "monolithic"},
        verification={"reference_models": 3, "utility_max_drop": 1.0},
    )
    with session_scope() as s:
        model_id = s.scalars(select(MLModel.id)).one()
    store = get_store()
    assert references.count(store, model_id) == 3
    # Seeds and checkpoint addresses derive from the model's name, not its random id:
    # the same data and settings give the same models on any install.
    refs = json.loads(store.read_bytes(references.path(model_id)))
    assert refs["model_key"] == "model:m:reference"
    with session_scope() as s:
        version = s.scalars(select(ModelVersion).where(ModelVersion.model_id == model_id)).one()
        manifest = json.loads(store.read_bytes(str(version.manifest_path)))
    assert manifest["model_key"] == "model:m" and model_id not in json.dumps(manifest["entries"])
    assert "references_retrained" not in _retrain(model_id)  # complete: none trained
    dropped = 0
    for i in range(1, 6):  # a few erased subjects take some references with them
        rid = env.client.post(
            "/v1/deletion-requests",
            headers=auth(admin),
            json={"kind": "subject", "subject_id": f"subj-{i:04d}"},
        ).json()["id"]
        plan_and_run(env.client, admin, rid)
        with session_scope() as s:
            job = s.scalars(select(Job).where(Job.status == "pending")).all()
        for j in job:
            if j.kind == "retrain":
                retraining.run_retrain(j.id, lifecycle.EVENTS)
        with session_scope() as s:
            lifecycle.erase(s, store, rid)
        dropped = 3 - references.count(store, model_id)
        if dropped:
            break
    assert dropped > 0
    result = _retrain(model_id)
    assert result["references_retrained"] == 3
    assert references.count(store, model_id) == 3
