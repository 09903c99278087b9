"""Shard outputs computed once: within one verification (`ShardOutputs`, shared by the
candidate, the baseline and a SISA model's out-references, which are the baseline's own
shards) and across jobs (the production version's shard outputs on the test rows, saved
when it is promoted and read by the next job's verification while the test rows are
the same).

Only the production version's outputs are kept, on the held-out test rows and on the
fixed sample of retained training rows whose membership scores the forgetting check
reports (`JobInputs.members`), one file per model, replaced at each promotion and
rewritten without a row's outputs when that row is erased: nothing lets anyone compare
a retired version's outputs, and no erased row's prediction stays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.core.settings import get_settings
from app.core.storage import ArtifactStore
from app.core.warm import Expiring
from app.ml.architectures import build_model
from app.ml.checkpoints import CheckpointStore, canonical_json
from app.ml.preprocess import PreprocessorState
from app.ml.sisa import SisaEnsemble, SisaManifest


def shard_key(entry_final_key: str, preprocessor: dict[str, object]) -> str:
    """What a shard's outputs depend on: its weights and its preprocessing."""
    return hashlib.sha256(canonical_json([entry_final_key, preprocessor]).encode()).hexdigest()


class ShardOutputs:
    """Shard outputs per (shard key, input rows) for one verification."""

    def __init__(self) -> None:
        self._out: dict[tuple[str, int], torch.Tensor] = {}
        # The inputs stay referenced while the cache lives, so their ids stay unique.
        self._inputs: dict[int, Mapping[str, np.ndarray]] = {}
        self._views: dict[int, tuple[Mapping[str, np.ndarray], np.ndarray]] = {}
        self.hits = 0
        self.misses = 0
        self.preloaded = 0

    def get(
        self,
        key: str,
        columns: Mapping[str, np.ndarray],
        compute: Callable[[Mapping[str, np.ndarray]], torch.Tensor],
    ) -> torch.Tensor:
        """The output for `key` on `columns`: cached, a slice of the output on the rows
        `columns` are a view of, or `compute(columns)`."""
        self._inputs.setdefault(id(columns), columns)
        k = (key, id(columns))
        if k in self._out:
            self.hits += 1
        elif id(columns) in self._views:
            whole, index = self._views[id(columns)]
            self._out[k] = self.get(key, whole, compute)[torch.as_tensor(index)]
        else:
            self.misses += 1
            self._out[k] = compute(columns)
        return self._out[k]

    def preload(
        self, columns: Mapping[str, np.ndarray], outputs: Mapping[str, torch.Tensor]
    ) -> None:
        self._inputs.setdefault(id(columns), columns)
        for key, value in outputs.items():
            self._out[(key, id(columns))] = value
            self.preloaded += 1

    def view(
        self, columns: Mapping[str, np.ndarray], whole: Mapping[str, np.ndarray], index: np.ndarray
    ) -> None:
        """`columns` are the rows `index` of `whole`: an output wanted on them is a slice
        of the output on `whole` (computed there once, or taken from what is there)."""
        self._inputs.setdefault(id(columns), columns)
        self._inputs.setdefault(id(whole), whole)
        self._views[id(columns)] = (whole, index)

    def of(self, columns: Mapping[str, np.ndarray], keys: list[str]) -> dict[str, torch.Tensor]:
        """The outputs computed on `columns` for `keys` (those that were computed)."""
        return {k: self._out[(k, id(columns))] for k in keys if (k, id(columns)) in self._out}


class SharedEnsemble(SisaEnsemble):
    """A loaded ensemble whose shard outputs go through a `ShardOutputs` cache."""

    outputs: ShardOutputs
    keys: dict[int, str]
    # Aggregated outputs per (input rows, shards): utility, fairness, forgetting and the
    # version's metrics all ask for the ensemble's outputs on the same test rows.
    _probas: dict[tuple[int, tuple[int, ...] | None], torch.Tensor]

    @classmethod
    def of(cls, ensemble: SisaEnsemble, outputs: ShardOutputs) -> SharedEnsemble:
        shared = cls(ensemble.manifest, ensemble.models, ensemble.preprocessors, ensemble.device)
        shared.outputs = outputs
        shared._probas = {}
        shared.keys = {
            e.shard: shard_key(e.final_key, e.preprocessor)
            for e in ensemble.manifest.entries
            if e.shard in ensemble.models
        }
        return shared

    def shard_proba(self, columns: Mapping[str, np.ndarray], shard: int) -> torch.Tensor:
        return self.outputs.get(
            self.keys[shard], columns, lambda rows: SisaEnsemble.shard_proba(self, rows, shard)
        )

    def predict_proba(
        self, columns: Mapping[str, np.ndarray], shards: Iterable[int] | None = None
    ) -> torch.Tensor:
        # The rows stay referenced by the outputs cache (`shard_proba`), so their id is
        # not reused while this memo lives; a copy is handed out, never the memo itself.
        key = (id(columns), None if shards is None else tuple(sorted(set(shards))))
        if key not in self._probas:
            self._probas[key] = super().predict_proba(columns, shards)
        return self._probas[key].clone()


class WarmModels:
    """A worker's loaded shard models, kept for the jobs that follow (each unlearning
    job verifies against the production ensemble, whose shards are mostly the previous
    job's). Keyed by checkpoint key and the SHA-256 recorded beside the checkpoint (read
    at every use), so a rewritten checkpoint is never served stale and a deleted one
    (a purged version's) is never served at all; at most `capacity` models, each dropped
    when unused for `warm_data_seconds`, like the warm datasets (0: none kept). Models
    are only evaluated, never trained."""

    def __init__(self, capacity: int = 64) -> None:
        self._models: Expiring[tuple[str, ...], torch.nn.Module] = Expiring(capacity)

    def get(
        self,
        manifest: SisaManifest,
        entry_key: str,
        prep: PreprocessorState,
        store: CheckpointStore,
        device: torch.device,
    ) -> torch.nn.Module:
        digest = getattr(store, "digest", lambda key: None)(entry_key)
        key = (
            entry_key,
            str(digest),
            repr(manifest.arch),
            str(prep.n_inputs),
            str(manifest.n_classes),
            str(device),
        )
        hit = self._models.get(key) if digest is not None else None
        if hit is not None:
            return hit
        model = build_model(manifest.arch, prep.n_inputs, manifest.n_classes)
        tensors, _ = store.load(entry_key)
        model.load_state_dict(tensors)
        model.to(device).eval()
        if digest is not None:
            self._models.put(key, model, get_settings().warm_data_seconds)
        return model

    def drop(self) -> None:
        self._models.drop()

    def __len__(self) -> int:
        return len(self._models)


WARM_MODELS = WarmModels()


def load_ensemble(
    manifest: SisaManifest, store: CheckpointStore, device: torch.device
) -> SisaEnsemble:
    """`SisaEnsemble.load`, through this worker's warm models."""
    models, preps = {}, {}
    for e in manifest.entries:
        if not e.n_records:
            continue
        prep = PreprocessorState.from_dict(e.preprocessor)
        models[e.shard] = WARM_MODELS.get(manifest, e.final_key, prep, store, device)
        preps[e.shard] = prep
    if not models:
        raise ValueError("the manifest has no trained shard")
    return SisaEnsemble(manifest, models, preps, device)


def load_sharing(
    manifest: SisaManifest, other: SisaEnsemble, store: CheckpointStore, device: torch.device
) -> SisaEnsemble:
    """`manifest`'s ensemble, taking every shard it shares with `other` (the same
    checkpoint and preprocessing: a candidate's unaffected shards) from `other` rather
    than loading it again. Models are only ever evaluated, so sharing them is safe."""
    same = {
        e.shard
        for e in manifest.entries
        if e.n_records
        and e.shard in other.models
        and other.manifest.entry(e.shard).final_key == e.final_key
        and other.manifest.entry(e.shard).preprocessor == e.preprocessor
    }
    models, preps = {}, {}
    for e in manifest.entries:
        if not e.n_records:
            continue
        if e.shard in same:
            models[e.shard], preps[e.shard] = other.models[e.shard], other.preprocessors[e.shard]
            continue
        prep = PreprocessorState.from_dict(e.preprocessor)
        models[e.shard] = WARM_MODELS.get(manifest, e.final_key, prep, store, device)
        preps[e.shard] = prep
    if not models:
        raise ValueError("the manifest has no trained shard")
    return SisaEnsemble(manifest, models, preps, device)


def rows_digest(record_ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(record_ids, dtype=np.int64).tobytes()).hexdigest()[:32]


def _folder(model_id: str) -> str:
    return f"models/{model_id}/outputs"


_ROWS = "__record_ids__"  # the test rows a kept file's outputs are on, in order


def load_kept_outputs(
    store: ArtifactStore, model_id: str, row_sets: Sequence[np.ndarray]
) -> list[dict[str, torch.Tensor]]:
    """For each set of rows (sorted record ids), the kept shard outputs on exactly those
    rows ({} where the kept file does not hold every one of them), the file read once:
    the file of exactly these rows, or one kept on more rows (the test rows and the
    member sample together; or a job whose requests quarantined test rows, which are no
    longer test rows of the job), taken at these rows."""
    found: list[dict[str, torch.Tensor]] = [{} for _ in row_sets]
    if len(row_sets) == 1:
        rel = f"{_folder(model_id)}/test-{rows_digest(row_sets[0])}.safetensors"
        if store.exists(rel):
            return [{k: v for k, v in st_load(store.read_bytes(rel)).items() if k != _ROWS}]
    for other in store.list(_folder(model_id)):
        tensors = dict(st_load(store.read_bytes(other)))
        rows = tensors.pop(_ROWS, None)
        if rows is None:
            continue
        ids = rows.numpy()
        for i, row_set in enumerate(row_sets):
            wanted = np.asarray(row_set, dtype=np.int64)
            pos = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
            if not found[i] and len(ids) and np.array_equal(ids[pos], wanted):
                index = torch.as_tensor(pos)
                found[i] = {k: v[index] for k, v in tensors.items()}
    return found


def load_test_outputs(
    store: ArtifactStore, model_id: str, test_ids: np.ndarray
) -> dict[str, torch.Tensor]:
    """The saved shard outputs on these test rows ({} when none are kept)."""
    return load_kept_outputs(store, model_id, [test_ids])[0]


def _write(
    store: ArtifactStore, model_id: str, row_ids: np.ndarray, tensors: dict[str, torch.Tensor]
) -> None:
    rel = f"{_folder(model_id)}/test-{rows_digest(row_ids)}.safetensors"
    rows = torch.as_tensor(np.asarray(row_ids, dtype=np.int64))
    blob = st_save({**{k: v.contiguous() for k, v in tensors.items()}, _ROWS: rows})
    store.write_bytes(rel, bytes(blob))
    for other in store.list(_folder(model_id)):
        if other != rel:
            store.delete(other)


def save_kept_outputs(
    store: ArtifactStore,
    model_id: str,
    manifest: SisaManifest,
    parts: Sequence[tuple[np.ndarray, Mapping[str, torch.Tensor]]],
) -> None:
    """Keep the production version's shard outputs on the rows of `parts` (each: record
    ids and the outputs on them; the first, the test rows, must hold every shard of
    `manifest`, a later part without every shard is left out), in one file sorted by
    record id, replacing whatever was kept before."""
    keys = [shard_key(e.final_key, e.preprocessor) for e in manifest.entries if e.n_records]
    complete = [(ids, out) for ids, out in parts if keys and all(k in out for k in keys)]
    if not parts or not complete or complete[0][0] is not parts[0][0]:
        return
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in complete])
    uniq, first = np.unique(ids, return_index=True)  # sorted; a row kept once
    index = torch.as_tensor(first)
    tensors = {k: torch.cat([out[k] for _, out in complete])[index] for k in keys}
    _write(store, model_id, uniq, tensors)


def save_test_outputs(
    store: ArtifactStore,
    model_id: str,
    test_ids: np.ndarray,
    manifest: SisaManifest,
    outputs: Mapping[str, torch.Tensor],
) -> None:
    """Keep the production version's shard outputs on the test rows (every shard of
    `manifest` must be present), replacing whatever was kept before."""
    save_kept_outputs(store, model_id, manifest, [(test_ids, outputs)])


def drop_rows(store: ArtifactStore, model_id: str, record_ids: list[int]) -> None:
    """Test rows of the model are being erased: the kept outputs lose their rows (the
    file is rewritten for the test rows that remain), so no prediction on an erased
    row is kept and the next job's verification still finds the others. A file that
    does not say which rows it holds is deleted."""
    gone = np.asarray(record_ids, dtype=np.int64)
    for rel in store.list(_folder(model_id)):
        if not store.exists(rel):
            continue  # replaced by the file written for an earlier one
        tensors = dict(st_load(store.read_bytes(rel)))
        rows = tensors.pop(_ROWS, None)
        if rows is None:
            store.delete(rel)
            continue
        ids = rows.numpy()
        keep = ~np.isin(ids, gone)
        if keep.all():
            continue
        index = torch.as_tensor(np.flatnonzero(keep))
        # Written under the remaining rows' name; the old file goes with the rest.
        _write(store, model_id, ids[keep], {k: v[index] for k, v in tensors.items()})
