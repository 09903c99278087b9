"""Where model versions live in the artifact store, and loading them for serving."""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Protocol

import numpy as np
import torch

from app.core.storage import ArtifactStore
from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.data import TabularData
from app.ml.device import resolve_device
from app.ml.sisa import SisaEnsemble, SisaManifest
from app.ml.weighting import GroupWeighting


class Predictor(Protocol):
    def predict_proba(self, columns: dict[str, np.ndarray]) -> torch.Tensor: ...


def checkpoint_store(store: ArtifactStore, model_id: str) -> FsspecCheckpointStore:
    """Checkpoints are content-addressed per model: versions share unchanged ones."""
    return FsspecCheckpointStore(store.fs, store.path(f"models/{model_id}/checkpoints"))


def manifest_path(model_id: str, version: int, digest: str | None = None) -> str:
    name = f"manifest-{digest[:16]}.json" if digest else "manifest.json"
    return f"models/{model_id}/versions/{version}/{name}"


def save_manifest(store: ArtifactStore, model_id: str, version: int, manifest: SisaManifest) -> str:
    """Write the manifest under a name derived from its bytes, before any row points to
    it: two executions of one job (a worker taken over while still alive) each write
    their own file, and a version's manifest never changes once its row commits."""
    blob = json.dumps(manifest.to_dict(), sort_keys=True).encode()
    rel = manifest_path(model_id, version, hashlib.sha256(blob).hexdigest())
    store.write_bytes(rel, blob)
    return rel


def drop_other_manifests(store: ArtifactStore, model_id: str, version: int, keep: str) -> None:
    """After a version's row commits: remove manifests of the same version number left
    by executions that crashed or were taken over (they never served)."""
    folder = f"models/{model_id}/versions/{version}"
    for rel in store.list(folder):
        if rel != keep and posixpath.basename(rel).startswith("manifest"):
            store.delete(rel)


def load_manifest(store: ArtifactStore, rel: str) -> SisaManifest:
    return SisaManifest.from_dict(json.loads(store.read_bytes(rel)))


def summary(manifest: SisaManifest, rel: str) -> dict[str, Any]:
    """What the database keeps of a manifest (record-id lists stay in the artifact)."""
    d = manifest.to_dict()
    # The same bytes `save_manifest` wrote: its digest without reading the file back.
    sha = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
    for entry in d["entries"]:
        entry.pop("record_ids", None)
    d["artifact"] = rel
    d["artifact_sha256"] = sha
    return d


def load_predictor(
    store: ArtifactStore, manifest_summary: dict[str, Any], device: str
) -> Predictor:
    manifest = load_manifest(store, manifest_summary["artifact"])
    model_id = manifest_summary["artifact"].split("/")[1]
    return SisaEnsemble.load(manifest, checkpoint_store(store, model_id), resolve_device(device))


def sample_weights(manifest: SisaManifest, data: TabularData) -> np.ndarray | None:
    """The loss weights every training of this model applies (a mitigation's frozen
    per-group table, carried by its manifest), aligned with `data`; None if unweighted."""
    table = GroupWeighting.from_dict(manifest.weighting)
    return None if table is None else table.apply(data)
