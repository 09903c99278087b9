"""Exact unlearning with SISA: sharded, isolated, sliced, aggregated training.

Each shard trains slice stages cumulatively (stage i sees slices 0..i, records sorted by
id) for the epochs its schedule gives it (app.ml.schedule: `training.epochs` read as
passes per record, or per stage for legacy models), with seeds derived from (model key,
shard, stage), and saves a checkpoint after each stage under a content address: a hash
chain over the configuration, the shard's preprocessor and the record ids of every slice
so far. Unlearning is then just training again with reuse: the checkpoints before the
earliest affected slice have unchanged keys and are loaded, everything after is
recomputed. Because training is deterministic, the result is bit-identical (on CPU) to
training the shard from scratch on its retained records, which is what the tests assert.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from app.ml.architectures import build_model, probabilities
from app.ml.checkpoints import CheckpointStore, canonical_json
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed, runtime_fingerprint
from app.ml.preprocess import PreprocessorState, fit_preprocessor
from app.ml.schedule import stage_epochs
from app.ml.training import fit, init_model_
from app.ml.trees import TreeEnsemble

ProgressFn = Callable[[float], None]

_KEY_VERSION = 1


def ids_digest(record_ids: np.ndarray) -> str:
    """SHA-256 of the sorted record ids (int64 little-endian)."""
    ids = np.sort(np.asarray(record_ids, dtype=np.int64))
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()


def weights_digest(record_ids: np.ndarray, sample_weight: np.ndarray) -> str:
    """SHA-256 of the weights in record-id order (float64 little-endian)."""
    order = np.argsort(np.asarray(record_ids, dtype=np.int64), kind="stable")
    w = np.asarray(sample_weight, dtype=np.float64)[order]
    return hashlib.sha256(w.astype("<f8").tobytes()).hexdigest()


def checkpoint_keys(
    record_ids: np.ndarray,
    slice_of: np.ndarray,
    *,
    slices: int,
    shard: int,
    preprocessor: PreprocessorState,
    arch: ArchitectureConfig,
    training: TrainingConfig,
    n_classes: int,
    model_key: str,
    sample_weight: np.ndarray | None = None,
) -> list[str]:
    """Content address of the checkpoint after each slice stage of one shard.

    The keys form a chain (key_i hashes key_{i-1} and slice i's ids) rather than hashing
    the cumulative id set alone, because a stage's weights depend on the whole sequence
    of slices, not only on their union. With `sample_weight` (aligned with `record_ids`)
    each link also hashes slice i's weights, so a weighted checkpoint never shares a key
    with an unweighted one (or one with other weights); without, keys are as before.
    """
    base = canonical_json(
        {
            "v": _KEY_VERSION,
            "arch": arch.to_dict(),
            "training": training.to_dict(),
            "n_classes": n_classes,
            "model_key": model_key,
            "shard": shard,
            "preprocessor": preprocessor.digest(),
        }
    )
    chain = hashlib.sha256(base.encode()).hexdigest()
    keys: list[str] = []
    for i in range(slices):
        part = ids_digest(record_ids[slice_of == i])
        if sample_weight is not None:
            part += "\x1fw" + weights_digest(
                record_ids[slice_of == i], sample_weight[slice_of == i]
            )
        chain = hashlib.sha256(f"{chain}\x1f{i}\x1f{part}".encode()).hexdigest()
        keys.append(f"sisa-s{shard}-i{i}-{chain[:40]}")
    return keys


@dataclass
class ShardResult:
    """What training one shard produced, and how much of it was actually computed."""

    shard: int
    checkpoint_keys: list[str]
    final_key: str
    preprocessor: PreprocessorState
    n_records: int
    record_ids: np.ndarray  # int64, sorted: the records this shard's final model saw
    slices_trained: int
    seconds: float


def _sub_progress(progress: ProgressFn | None, lo: float, width: float) -> ProgressFn | None:
    """Maps a part's own 0..1 progress onto [lo, lo + width] of the whole."""
    if progress is None:
        return None
    report = progress

    def sub(f: float) -> None:
        report(min(1.0, lo + width * f))

    return sub


def _stage_seed(training: TrainingConfig, model_key: str, shard: int, stage: object) -> int:
    return derive_seed(training.seed, model_key, shard, stage)


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def train_shard(
    data: TabularData,
    slice_of: np.ndarray,
    *,
    shard: int,
    feature_spec: FeatureSpec,
    arch: ArchitectureConfig,
    training: TrainingConfig,
    sisa: SisaConfig,
    n_classes: int,
    model_key: str,
    store: CheckpointStore,
    device: torch.device,
    reuse: bool = True,
    progress: ProgressFn | None = None,
    sample_weight: np.ndarray | None = None,
) -> ShardResult:
    """Train one shard on exactly `data` (its retained records), slice stage by stage.

    `slice_of` gives each row's slice (aligned with `data`). With `reuse`, the latest stage
    whose checkpoint already exists is the starting point, which is how unlearning reuses
    everything before the earliest affected slice. `sample_weight` (aligned with `data`)
    weights each record's loss in every stage (see `fit`); it enters the checkpoint keys.
    """
    t0 = time.perf_counter()
    slice_of = np.asarray(slice_of, dtype=np.int64)
    if len(slice_of) != len(data):
        raise ValueError("slice_of must have one entry per record")
    if len(slice_of) and (slice_of.min() < 0 or slice_of.max() >= sisa.slices):
        raise ValueError(f"slice indices must lie in [0, {sisa.slices})")
    # Data order is defined on record ids alone, never on how the caller assembled rows.
    order = np.argsort(data.record_ids, kind="stable")
    if np.any(order != np.arange(len(order))):
        data = data.take(order)
        slice_of = slice_of[order]
    weights: np.ndarray | None = None
    if sample_weight is not None:
        weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if len(weights) != len(order):
            raise ValueError("sample_weight must have one entry per record")
        weights = weights[order]
    ids = np.asarray(data.record_ids, dtype=np.int64)
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise ValueError("record ids must be unique")

    # Learned state like the weights: fitted on the retained records only.
    prep = fit_preprocessor(feature_spec, data.columns)
    keys = checkpoint_keys(
        ids,
        slice_of,
        slices=sisa.slices,
        shard=shard,
        preprocessor=prep,
        arch=arch,
        training=training,
        n_classes=n_classes,
        model_key=model_key,
        sample_weight=weights,
    )
    start = 0
    if reuse:
        for i in reversed(range(sisa.slices)):
            if store.exists(keys[i]):
                start = i + 1
                break

    if start < sisa.slices:
        model = build_model(arch, prep.n_inputs, n_classes)
        if start == 0:
            init_model_(model, _stage_seed(training, model_key, shard, "init"))
        else:
            tensors, _ = store.load(keys[start - 1])
            model.load_state_dict(tensors)
        model.to(device)
        x = prep.transform(data.columns)
        y = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        epochs = stage_epochs(training, sisa.slices)
        # Progress counts sample-gradient steps: stage i costs its rows x its epochs.
        counts = [int(np.count_nonzero(slice_of <= i)) * epochs[i] for i in range(sisa.slices)]
        total_work = max(1, sum(counts[start:]))
        done_work = 0
        base_meta = {
            "arch": arch.to_dict(),
            "training": training.to_dict(),
            "sisa": sisa.to_dict(),
            "shard": shard,
            "n_classes": n_classes,
            "model_key": model_key,
            "preprocessor": prep.to_dict(),
            "runtime": runtime_fingerprint(device),
        }
        for i in range(start, sisa.slices):
            rows = np.flatnonzero(slice_of <= i)
            stage_progress = _sub_progress(progress, done_work / total_work, counts[i] / total_work)
            idx = torch.from_numpy(rows)
            if isinstance(model, TreeEnsemble):
                # Trees fit from scratch on the stage's rows (app.ml.trees): exact.
                model.fit_tree(
                    x[idx],
                    y[idx],
                    _stage_seed(training, model_key, shard, i),
                    sample_weight=None if weights is None else torch.from_numpy(weights[rows]),
                )
            else:
                fit(
                    model,
                    x[idx],
                    y[idx],
                    training,
                    _stage_seed(training, model_key, shard, i),
                    epochs=epochs[i],
                    progress=stage_progress,
                    sample_weight=None if weights is None else torch.from_numpy(weights[rows]),
                )
            meta = {
                **base_meta,
                "slice": i,
                "n_records": len(rows),
                "record_ids_sha256": ids_digest(ids[rows]),
            }
            if weights is not None:
                meta["sample_weight_sha256"] = weights_digest(ids[rows], weights[rows])
            store.save(keys[i], _state_tensors(model), meta)
            done_work += counts[i]
            if progress is not None:
                progress(min(1.0, done_work / total_work))
    elif progress is not None:
        progress(1.0)

    return ShardResult(
        shard=shard,
        checkpoint_keys=keys,
        final_key=keys[-1],
        preprocessor=prep,
        n_records=len(ids),
        record_ids=ids,
        slices_trained=sisa.slices - start,
        seconds=time.perf_counter() - t0,
    )


@dataclass
class ShardEntry:
    """One shard of a SISA model version: its final checkpoint and what it was trained on."""

    shard: int
    final_key: str
    checkpoint_keys: list[str]
    preprocessor: dict[str, Any]
    n_records: int
    record_ids: list[int]

    @cached_property
    def ids(self) -> np.ndarray:
        """`record_ids` as int64, built once (entries are never changed in place)."""
        return np.asarray(self.record_ids, dtype=np.int64)

    @classmethod
    def from_result(cls, r: ShardResult) -> ShardEntry:
        return cls(
            shard=r.shard,
            final_key=r.final_key,
            checkpoint_keys=list(r.checkpoint_keys),
            preprocessor=r.preprocessor.to_dict(),
            n_records=r.n_records,
            record_ids=np.asarray(r.record_ids, dtype=np.int64).tolist(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "final_key": self.final_key,
            "checkpoint_keys": list(self.checkpoint_keys),
            "preprocessor": self.preprocessor,
            "n_records": self.n_records,
            "record_ids": list(self.record_ids),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardEntry:
        return cls(
            shard=int(d["shard"]),
            final_key=str(d["final_key"]),
            checkpoint_keys=[str(k) for k in d["checkpoint_keys"]],
            preprocessor=dict(d["preprocessor"]),
            n_records=int(d["n_records"]),
            record_ids=[int(v) for v in d["record_ids"]],
        )


@dataclass
class SisaManifest:
    """A SISA model version: configs, the runtime it was trained on, one entry per shard."""

    model_key: str
    arch: ArchitectureConfig
    training: TrainingConfig
    sisa: SisaConfig
    feature_spec: FeatureSpec
    n_classes: int
    entries: list[ShardEntry]
    runtime: dict[str, Any] = field(default_factory=dict)
    # Frozen per-group loss weights of a fairness mitigation (`GroupWeighting.to_dict`);
    # every later training of this model applies them. None: unweighted.
    weighting: dict[str, Any] | None = None
    # Per-group decision thresholds of a post-processing mitigation
    # (`GroupThresholds.to_dict`): decisions only, the probabilities are untouched.
    thresholds: dict[str, Any] | None = None

    def entry(self, shard: int) -> ShardEntry:
        for e in self.entries:
            if e.shard == shard:
                return e
        raise KeyError(shard)

    def shards_containing(self, record_ids: Iterable[int]) -> set[int]:
        """Shards whose final model saw any of `record_ids`."""
        wanted = np.asarray(list(record_ids), dtype=np.int64)
        return {e.shard for e in self.entries if np.isin(e.ids, wanted).any()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_key": self.model_key,
            "arch": self.arch.to_dict(),
            "training": self.training.to_dict(),
            "sisa": self.sisa.to_dict(),
            "feature_spec": self.feature_spec.to_dict(),
            "n_classes": self.n_classes,
            "entries": [e.to_dict() for e in self.entries],
            "runtime": dict(self.runtime),
            **({"weighting": self.weighting} if self.weighting else {}),
            **({"thresholds": self.thresholds} if self.thresholds else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SisaManifest:
        return cls(
            model_key=str(d["model_key"]),
            arch=ArchitectureConfig.from_dict(d["arch"]),
            training=TrainingConfig.from_dict(d["training"]),
            sisa=SisaConfig.from_dict(d["sisa"]),
            feature_spec=FeatureSpec.from_dict(d["feature_spec"]),
            n_classes=int(d["n_classes"]),
            entries=[ShardEntry.from_dict(e) for e in d["entries"]],
            runtime=dict(d.get("runtime", {})),
            weighting=d.get("weighting") or None,
            thresholds=d.get("thresholds") or None,
        )


def _train_shards(
    data: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    shards: list[int],
    *,
    feature_spec: FeatureSpec,
    arch: ArchitectureConfig,
    training: TrainingConfig,
    sisa: SisaConfig,
    n_classes: int,
    model_key: str,
    store: CheckpointStore,
    device: torch.device,
    reuse: bool,
    progress: ProgressFn | None,
    sample_weight: np.ndarray | None = None,
) -> dict[int, ShardResult]:
    shard_of = np.asarray(shard_of, dtype=np.int64)
    slice_of = np.asarray(slice_of, dtype=np.int64)
    if len(shard_of) != len(data) or len(slice_of) != len(data):
        raise ValueError("shard_of and slice_of must have one entry per record")
    if sample_weight is not None and len(sample_weight) != len(data):
        raise ValueError("sample_weight must have one entry per record")
    if len(shard_of) and (shard_of.min() < 0 or shard_of.max() >= sisa.shards):
        raise ValueError(f"shard indices must lie in [0, {sisa.shards})")
    rows = {s: np.flatnonzero(shard_of == s) for s in shards}
    # Progress is weighted by shard size (training cost is about linear in records).
    weights = {s: len(rows[s]) + 1 for s in shards}
    total = sum(weights.values()) or 1
    done = 0
    results: dict[int, ShardResult] = {}
    for s in shards:
        sub = _sub_progress(progress, done / total, weights[s] / total)
        results[s] = train_shard(
            data.take(rows[s]),
            slice_of[rows[s]],
            shard=s,
            feature_spec=feature_spec,
            arch=arch,
            training=training,
            sisa=sisa,
            n_classes=n_classes,
            model_key=model_key,
            store=store,
            device=device,
            reuse=reuse,
            progress=sub,
            sample_weight=None if sample_weight is None else np.asarray(sample_weight)[rows[s]],
        )
        done += weights[s]
    if progress is not None:
        progress(1.0)
    return results


def train_sisa(
    data: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    *,
    feature_spec: FeatureSpec,
    arch: ArchitectureConfig,
    training: TrainingConfig,
    sisa: SisaConfig,
    n_classes: int,
    model_key: str,
    store: CheckpointStore,
    device: torch.device,
    shards_to_train: set[int] | None = None,
    previous: SisaManifest | None = None,
    reuse: bool = True,
    progress: ProgressFn | None = None,
    sample_weight: np.ndarray | None = None,
) -> SisaManifest:
    """Train every shard (or only `shards_to_train`, taking the others from `previous`).

    `shard_of` and `slice_of` are the persisted layout, aligned with `data`, and so is
    `sample_weight` (per-record loss weights, e.g. a group-reweighted mitigation).
    """
    all_shards = list(range(sisa.shards))
    if shards_to_train is None:
        todo = all_shards
    else:
        if previous is None:
            raise ValueError("training a subset of shards needs the previous manifest")
        todo = sorted(s for s in shards_to_train if 0 <= s < sisa.shards)
    results = _train_shards(
        data,
        shard_of,
        slice_of,
        todo,
        feature_spec=feature_spec,
        arch=arch,
        training=training,
        sisa=sisa,
        n_classes=n_classes,
        model_key=model_key,
        store=store,
        device=device,
        reuse=reuse,
        progress=progress,
        sample_weight=sample_weight,
    )
    entries: list[ShardEntry] = []
    for s in all_shards:
        if s in results:
            entries.append(ShardEntry.from_result(results[s]))
        else:
            assert previous is not None
            entries.append(previous.entry(s))
    return SisaManifest(
        model_key=model_key,
        arch=arch,
        training=training,
        sisa=sisa,
        feature_spec=feature_spec,
        n_classes=n_classes,
        entries=entries,
        runtime=runtime_fingerprint(device),
    )


@dataclass
class UnlearnStats:
    """What an unlearning request cost: which shards, and how many slice stages each."""

    affected_shards: list[int]
    total_shards: int
    slices_retrained: dict[int, int]
    earliest_affected_slice: dict[int, int]
    forgotten_found: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "affected_shards": list(self.affected_shards),
            "total_shards": self.total_shards,
            "slices_retrained": {str(k): v for k, v in self.slices_retrained.items()},
            "earliest_affected_slice": {str(k): v for k, v in self.earliest_affected_slice.items()},
            "forgotten_found": self.forgotten_found,
            "seconds": self.seconds,
        }


def unlearn_sisa(
    manifest: SisaManifest,
    data_retained: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    forgotten_ids: np.ndarray,
    *,
    store: CheckpointStore,
    device: torch.device,
    feature_spec: FeatureSpec | None = None,
    progress: ProgressFn | None = None,
    sample_weight: np.ndarray | None = None,
) -> tuple[SisaManifest, UnlearnStats]:
    """Forget `forgotten_ids`: retrain only the shards that saw them, reusing checkpoints.

    `data_retained` with its persisted `shard_of`/`slice_of` is the training data after the
    deletion (any forgotten rows still present are dropped here). Each affected shard is
    retrained on exactly its retained rows. Idempotent: running it twice recomputes nothing.
    `sample_weight` (aligned with `data_retained`) must be the weights the model was
    trained with (a mitigation's frozen table), or the chain keys will not match and the
    affected shards restart from slice 0.
    """
    t0 = time.perf_counter()
    forgotten = np.unique(np.asarray(forgotten_ids, dtype=np.int64))
    keep = ~np.isin(np.asarray(data_retained.record_ids, dtype=np.int64), forgotten)
    shard_of = np.asarray(shard_of, dtype=np.int64)
    slice_of = np.asarray(slice_of, dtype=np.int64)
    weights = None if sample_weight is None else np.asarray(sample_weight)
    data = data_retained
    if not keep.all():  # the usual caller has dropped them already: no copy of the table
        data = data_retained.take(keep)
        shard_of, slice_of = shard_of[keep], slice_of[keep]
        weights = None if weights is None else weights[keep]

    affected: list[int] = []
    found = 0
    for e in manifest.entries:
        hit = int(np.isin(e.ids, forgotten).sum())
        if hit:
            affected.append(e.shard)
            found += hit
    spec = feature_spec if feature_spec is not None else manifest.feature_spec
    results = _train_shards(
        data,
        shard_of,
        slice_of,
        affected,
        feature_spec=spec,
        arch=manifest.arch,
        training=manifest.training,
        sisa=manifest.sisa,
        n_classes=manifest.n_classes,
        model_key=manifest.model_key,
        store=store,
        device=device,
        reuse=True,
        progress=progress,
        sample_weight=weights,
    )
    earliest: dict[int, int] = {}
    for s, r in results.items():
        old = manifest.entry(s).checkpoint_keys
        changed = [
            i for i, (a, b) in enumerate(zip(old, r.checkpoint_keys, strict=False)) if a != b
        ]
        earliest[s] = changed[0] if changed else manifest.sisa.slices
    entries = [
        ShardEntry.from_result(results[e.shard]) if e.shard in results else e
        for e in manifest.entries
    ]
    new = SisaManifest(
        model_key=manifest.model_key,
        arch=manifest.arch,
        training=manifest.training,
        sisa=manifest.sisa,
        feature_spec=spec,
        n_classes=manifest.n_classes,
        entries=entries,
        runtime=runtime_fingerprint(device),
        weighting=manifest.weighting,
        thresholds=manifest.thresholds,
    )
    stats = UnlearnStats(
        affected_shards=affected,
        total_shards=manifest.sisa.shards,
        slices_retrained={s: r.slices_trained for s, r in results.items()},
        earliest_affected_slice=earliest,
        forgotten_found=found,
        seconds=time.perf_counter() - t0,
    )
    return new, stats


class SisaEnsemble:
    """The loaded shard models of one manifest; aggregates their class probabilities.

    Empty shards (no records) have no model worth asking and are left out.
    """

    def __init__(
        self,
        manifest: SisaManifest,
        models: dict[int, nn.Module],
        preprocessors: dict[int, PreprocessorState],
        device: torch.device,
    ) -> None:
        self.manifest = manifest
        self.models = models
        self.preprocessors = preprocessors
        self.device = device

    @classmethod
    def load(
        cls, manifest: SisaManifest, store: CheckpointStore, device: torch.device
    ) -> SisaEnsemble:
        models: dict[int, nn.Module] = {}
        preps: dict[int, PreprocessorState] = {}
        for e in manifest.entries:
            if e.n_records == 0:
                continue
            prep = PreprocessorState.from_dict(e.preprocessor)
            model = build_model(manifest.arch, prep.n_inputs, manifest.n_classes)
            tensors, _ = store.load(e.final_key)
            model.load_state_dict(tensors)
            model.to(device).eval()
            models[e.shard] = model
            preps[e.shard] = prep
        if not models:
            raise ValueError("the manifest has no trained shard")
        return cls(manifest, models, preps, device)

    @property
    def shards(self) -> list[int]:
        return sorted(self.models)

    @torch.no_grad()
    def shard_proba(self, columns: Mapping[str, np.ndarray], shard: int) -> torch.Tensor:
        """One shard's class probabilities (N, C), on the CPU."""
        x = self.preprocessors[shard].transform(columns).to(self.device)
        model = self.models[shard]
        model.eval()
        return probabilities(model(x)).cpu()

    def shard_probas(
        self, columns: Mapping[str, np.ndarray], shards: Iterable[int] | None = None
    ) -> dict[int, torch.Tensor]:
        chosen = self.shards if shards is None else sorted(set(shards) & set(self.models))
        return {s: self.shard_proba(columns, s) for s in chosen}

    def predict_proba(
        self, columns: Mapping[str, np.ndarray], shards: Iterable[int] | None = None
    ) -> torch.Tensor:
        """Aggregated (N, C): mean of shard probabilities, or vote shares for `vote`.

        `shards` restricts the ensemble (e.g. to shards that never saw a record).
        """
        per = self.shard_probas(columns, shards)
        if not per:
            raise ValueError("no shard selected")
        stacked = torch.stack([per[s] for s in sorted(per)])  # (S, N, C)
        if self.manifest.sisa.aggregation == "vote":
            votes = nn.functional.one_hot(stacked.argmax(dim=2), stacked.shape[2])
            return votes.to(torch.float32).mean(dim=0)
        return stacked.mean(dim=0)
