"""Reference models for the forgetting check of monolithic models.

K models of the same architecture, each trained on a random half of the training
records when the model's first version is trained (Carlini et al.'s shadow models with
known membership). They are stored like a SISA manifest whose "shards" are the halves,
so the check treats them exactly like a SISA model's own shards: for any record, the
references whose half excludes it are out-references.

They are trained on personal data too: when records are erased, every reference that
trained on them is deleted (`drop_trained_on`); with fewer references left the check
calibrates on the rest, and a fallback retrain trains a fresh set.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from app.core.storage import ArtifactStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed, runtime_fingerprint
from app.ml.sisa import ShardEntry, SisaEnsemble, SisaManifest, train_shard
from app.registry import artifacts


def path(model_id: str) -> str:
    return f"models/{model_id}/references.json"


def train_references(
    store: ArtifactStore,
    model_id: str,
    train: TabularData,
    *,
    seed_key: str | None = None,
    k: int,
    feature_spec: FeatureSpec,
    arch: ArchitectureConfig,
    training: TrainingConfig,
    n_classes: int,
    device: torch.device,
) -> str | None:
    """Train K half-data references and save their manifest; returns its path."""
    if k < 1 or len(train) < 4:
        return None
    key = model_id if seed_key is None else seed_key
    sisa = SisaConfig(shards=k, slices=1, sharding="random")
    ckpt = artifacts.checkpoint_store(store, model_id)
    entries: list[ShardEntry] = []
    for j in range(k):
        rng = np.random.default_rng(derive_seed(training.seed, key, "reference", j))
        half = np.flatnonzero(rng.random(len(train)) < 0.5)
        res = train_shard(
            train.take(half),
            np.zeros(len(half), dtype=np.int64),
            shard=j,
            feature_spec=feature_spec,
            arch=arch,
            training=training,
            sisa=sisa,
            n_classes=n_classes,
            model_key=f"{key}:reference",
            store=ckpt,
            device=device,
        )
        entries.append(ShardEntry.from_result(res))
    manifest = SisaManifest(
        model_key=f"{key}:reference",
        arch=arch,
        training=training,
        sisa=sisa,
        feature_spec=feature_spec,
        n_classes=n_classes,
        entries=entries,
        runtime=runtime_fingerprint(device),
    )
    rel = path(model_id)
    store.write_bytes(rel, json.dumps(manifest.to_dict(), sort_keys=True).encode())
    return rel


def load(store: ArtifactStore, model_id: str, device: torch.device) -> SisaEnsemble | None:
    rel = path(model_id)
    if not store.exists(rel):
        return None
    manifest = SisaManifest.from_dict(json.loads(store.read_bytes(rel)))
    live = [e for e in manifest.entries if e.n_records > 0]
    if not live:
        return None
    return SisaEnsemble.load(
        replace(manifest, entries=live), artifacts.checkpoint_store(store, model_id), device
    )


def drop_trained_on(store: ArtifactStore, model_id: str, record_ids: list[int]) -> int:
    """Delete every reference that trained on any of `record_ids`; returns how many."""
    rel = path(model_id)
    if not store.exists(rel):
        return 0
    manifest = SisaManifest.from_dict(json.loads(store.read_bytes(rel)))
    erased = np.asarray(record_ids, dtype=np.int64)
    ckpt = artifacts.checkpoint_store(store, model_id)
    keep: list[ShardEntry] = []
    dropped = 0
    for e in manifest.entries:
        if e.n_records and np.isin(np.asarray(e.record_ids, dtype=np.int64), erased).any():
            for key in e.checkpoint_keys:
                ckpt.delete(key)
            dropped += 1
        else:
            keep.append(e)
    if dropped:
        if keep:
            new = replace(manifest, entries=keep)
            store.write_bytes(rel, json.dumps(new.to_dict(), sort_keys=True).encode())
        else:
            store.delete(rel)
    return dropped


def count(store: ArtifactStore, model_id: str) -> int:
    """How many references are left (erasures delete those that trained on erased rows)."""
    rel = path(model_id)
    if not store.exists(rel):
        return 0
    manifest = SisaManifest.from_dict(json.loads(store.read_bytes(rel)))
    return sum(1 for e in manifest.entries if e.n_records > 0)
