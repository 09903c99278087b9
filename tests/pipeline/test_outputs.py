"""Shard outputs kept from the production version (on the test rows and the member sample):
equal to computing them afresh, used by the next job's verification, replaced on
promotion, and gone once their row is erased."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import get_store
from app.datasets import service as datasets
from app.ml.device import resolve_device
from app.ml.sisa import SisaEnsemble
from app.models import DeletionRequest, Lineage, MLModel, ModelVersion, Record, Subject
from app.pipeline import outputs
from app.registry import artifacts
from app.requests import lifecycle
from tests.support.app_env import AppEnv
from tests.support.factories import (
    auth,
    create_key,
    create_model,
    make_csv,
    make_rows,
    plan_and_run,
    upload_dataset,
)


def _kept(env: AppEnv) -> list[str]:
    return sorted(p for p in env.artifact_files() if "/outputs/" in p)


def _production() -> tuple[str, ModelVersion, np.ndarray]:
    with session_scope() as s:
        model = s.scalars(select(MLModel)).one()
        version = s.scalars(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id,
                ModelVersion.version == model.production_version,
            )
        ).one()
        s.expunge(version)
        test_ids = np.asarray(
            sorted(
                s.scalars(
                    select(Lineage.record_id).where(
                        Lineage.model_id == model.id,
                        Lineage.split == "test",
                        Lineage.to_version.is_(None),
                    )
                )
            ),
            dtype=np.int64,
        )
        return model.id, version, test_ids


def _kept_rows(env: AppEnv) -> np.ndarray:
    from safetensors.torch import load as st_load

    (kept,) = _kept(env)
    return np.asarray(st_load(get_store().read_bytes(kept))["__record_ids__"].numpy())


def _assert_kept_equal_fresh(model_id: str, version: ModelVersion, test_ids: np.ndarray) -> None:
    store = get_store()
    saved = outputs.load_test_outputs(store, model_id, test_ids)
    manifest = artifacts.load_manifest(store, version.manifest_path)
    ensemble = SisaEnsemble.load(
        manifest, artifacts.checkpoint_store(store, model_id), resolve_device("cpu")
    )
    with session_scope() as s:
        ds = datasets.get(s, s.get(MLModel, model_id).dataset_id)  # type: ignore[union-attr]
        s.expunge(ds)
    test = datasets.to_tabular(ds, datasets.read_partitions(store, ds), test_ids)
    trained = [e for e in manifest.entries if e.n_records]
    assert len(saved) == len(trained)
    for e in trained:
        fresh = ensemble.shard_proba(test.columns, e.shard)
        assert torch.equal(saved[outputs.shard_key(e.final_key, e.preprocessor)], fresh)


def _request(env: AppEnv, admin: str, subject_id: str) -> str:
    body = {"kind": "subject", "subject_id": subject_id}
    return str(
        env.client.post("/v1/deletion-requests", headers=auth(admin), json=body).json()["id"]
    )


def _subject_with(split: str) -> str:
    """The external id of a subject whose rows lie only in `split` of the model."""
    with session_scope() as s:
        rows = s.execute(
            select(Subject.subject_key, Record.id, Lineage.split)
            .join(Record, Record.subject_id == Subject.id)
            .join(Lineage, Lineage.record_id == Record.id)
        ).all()
    splits: dict[str, set[str]] = {}
    for key, _, sp in rows:
        splits.setdefault(key, set()).add(sp)
    keys = {k for k, v in splits.items() if v == {split}}
    from app.core.security import subject_key
    from app.core.settings import get_settings

    pepper = get_settings().pepper
    for i in range(60):
        sid = f"subj-{i:04d}"
        if subject_key(sid, pepper) in keys:
            return sid
    raise AssertionError(f"no subject only in {split}")


def _records_of(subject_id: str) -> set[int]:
    """The record ids of a subject (by its external id)."""
    from app.core.security import subject_key
    from app.core.settings import get_settings

    key = subject_key(subject_id, get_settings().pepper)
    with session_scope() as s:
        return set(
            s.scalars(
                select(Record.id)
                .join(Subject, Record.subject_id == Subject.id)
                .where(Subject.subject_key == key)
            )
        )


def test_kept_outputs_serve_the_next_job_and_go_with_an_erased_row(env: AppEnv) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=60, rows_per_subject=2))
    create_model(env.client, admin, ds["id"], unlearning={"mode": "sisa", "shards": 3, "slices": 2})
    assert len(_kept(env)) == 1  # the first version's, on its test rows
    _assert_kept_equal_fresh(*_production())

    # The next job's verification reads them instead of running the unchanged shards,
    # and its promoted version's outputs replace them.
    rid = _request(env, admin, _subject_with("train"))
    view = plan_and_run(env.client, admin, rid)
    assert view["status"] == "erasing", view
    job = env.client.get(f"/v1/jobs/{view['models'][0]['job_id']}", headers=auth(admin)).json()
    assert job["result"]["unlearning"]["verification_cache"]["kept_from_production"] > 0
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    model_id, version, test_ids = _production()
    assert version.version == 2 and len(_kept(env)) == 1
    _assert_kept_equal_fresh(model_id, version, test_ids)
    # The promoted version's outputs on the job's member sample (retained training rows,
    # never a forgotten one) are kept beside the test rows', equal to fresh ones too.
    with session_scope() as s:
        train = set(
            s.scalars(
                select(Lineage.record_id).where(
                    Lineage.model_id == model_id,
                    Lineage.split == "train",
                    Lineage.to_version.is_(None),
                )
            )
        )
    rows = _kept_rows(env)
    members = np.setdiff1d(rows, test_ids)
    assert len(members) and set(members.tolist()) <= train
    _assert_kept_equal_fresh(model_id, version, members)

    # A subject with test rows only: erasing them takes their rows out of the kept
    # outputs (no prediction on an erased row stays); the rest still serve and are
    # still what the production version computes on the remaining test rows.
    sid = _subject_with("test")
    erased = _records_of(sid)
    assert erased and erased <= set(test_ids.tolist())
    rid = _request(env, admin, sid)
    with session_scope() as s:
        lifecycle.plan(s, rid)
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    model_id, version, remaining = _production()
    assert len(remaining) == len(test_ids) - len(erased)
    rows = _kept_rows(env)
    assert np.array_equal(rows, np.union1d(remaining, members))
    assert not erased & set(rows.tolist())
    _assert_kept_equal_fresh(model_id, version, remaining)

    # A training row of the member sample erased (here straight after planning, as an
    # erasure that no promotion replaced the file for): its kept output goes too.
    sid = _subject_with("train")
    erased = _records_of(sid)
    assert erased & set(rows.tolist())
    rid = _request(env, admin, sid)
    with session_scope() as s:
        req = s.get(DeletionRequest, rid)
        assert req is not None
        req.status = "erasing"  # the erasure step on its own: no job replaced the file
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    assert _kept(env) and not erased & set(_kept_rows(env).tolist())


def test_rows_that_are_a_view_of_others_take_a_slice_of_their_outputs() -> None:
    cache = outputs.ShardOutputs()
    whole = {"x": np.arange(6, dtype=np.float64)}
    part = {"x": whole["x"][[1, 4]]}
    cache.view(part, whole, np.asarray([1, 4]))
    calls: list[int] = []

    def compute(rows: dict[str, np.ndarray]) -> torch.Tensor:
        calls.append(len(rows["x"]))
        return torch.as_tensor(rows["x"] * 10)

    assert torch.equal(
        cache.get("k", part, compute), torch.tensor([10.0, 40.0], dtype=torch.float64)
    )
    # Computed once, on the whole rows; asking for them then is a hit.
    assert calls == [6]
    assert torch.equal(cache.get("k", whole, compute), torch.as_tensor(whole["x"] * 10))
    assert calls == [6] and cache.misses == 1


def _trained(env: AppEnv, shards: int, slices: int) -> tuple[Any, Any, torch.device]:
    """A SISA model trained on 30 subjects: its production manifest, checkpoint store
    and the CPU device."""
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=30, rows_per_subject=2))
    create_model(
        env.client, admin, ds["id"], unlearning={"mode": "sisa", "shards": shards, "slices": slices}
    )
    model_id, version, _ = _production()
    store = get_store()
    manifest = artifacts.load_manifest(store, version.manifest_path)
    return manifest, artifacts.checkpoint_store(store, model_id), resolve_device("cpu")


def test_warm_models_serve_the_next_job_but_never_a_deleted_checkpoint(env: AppEnv) -> None:
    manifest, ckpt, dev = _trained(env, 2, 2)
    first = outputs.load_ensemble(manifest, ckpt, dev)
    again = outputs.load_ensemble(manifest, ckpt, dev)
    fresh = SisaEnsemble.load(manifest, ckpt, dev)
    shard = first.shards[0]
    assert again.models[shard] is first.models[shard]  # kept, not loaded again
    for name, t in fresh.models[shard].state_dict().items():
        assert torch.equal(first.models[shard].state_dict()[name], t)
    ckpt.delete(manifest.entry(shard).final_key)
    # A purged checkpoint is gone for the warm copy too: loading it fails as it would.
    with pytest.raises((FileNotFoundError, KeyError, OSError)):
        outputs.load_ensemble(manifest, ckpt, dev)


def test_a_shared_ensembles_outputs_on_the_same_rows_are_aggregated_once(env: AppEnv) -> None:
    manifest, ckpt, dev = _trained(env, 3, 1)
    fresh = SisaEnsemble.load(manifest, ckpt, dev)
    shared = outputs.SharedEnsemble.of(
        outputs.load_ensemble(manifest, ckpt, dev), outputs.ShardOutputs()
    )
    new = make_rows(n_subjects=12, seed=5)
    columns = {
        "age": np.asarray([r["age"] for r in new], dtype=np.float64),
        "score": np.asarray([r["score"] for r in new], dtype=np.float64),
        "colour": np.asarray([r["colour"] for r in new], dtype=object),
        "region": np.asarray([r["region"] for r in new], dtype=np.float64),
    }
    first = shared.predict_proba(columns)
    assert torch.equal(first, fresh.predict_proba(columns))
    first.zero_()  # a caller writing into what it got changes nothing kept
    assert torch.equal(shared.predict_proba(columns), fresh.predict_proba(columns))
    two = shared.shards[:2]
    assert torch.equal(shared.predict_proba(columns, two), fresh.predict_proba(columns, two))
    # Each shard's outputs were computed once, whichever aggregate asked for them, and
    # each aggregate once (all shards, and the two).
    assert shared.outputs.misses == len(shared.shards)
    assert len(shared._probas) == 2
