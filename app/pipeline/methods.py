"""Engine glue for monolithic models, feature removal and fallback retraining.

A monolithic model is a 1-shard, 1-slice SisaManifest, so it is stored, versioned,
served and purged exactly like a SISA ensemble. What differs is how it forgets:
approximately (a strategy from `app.ml.approximate`, or certified removal for logistic
models created with `certified: true`), by feature removal, or by retraining from
scratch. Everything here takes tensors, data and a checkpoint store; the database is
the caller's business.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from app.ml.approximate import run_strategy
from app.ml.architectures import LogisticRegression, build_model, input_layer
from app.ml.autotune import AutoChoice, select
from app.ml.certified import (
    CertifiedConfig,
    CertifiedState,
    remove,
    sigma_of,
    to_module,
    train_certified,
)
from app.ml.checkpoints import CheckpointStore, canonical_json
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed, runtime_fingerprint
from app.ml.encoders import MediaModel
from app.ml.features import linear_feature_update, mlp_feature_removal
from app.ml.preprocess import PreprocessorState, fit_preprocessor
from app.ml.sisa import (
    ProgressFn,
    ShardEntry,
    SisaEnsemble,
    SisaManifest,
    ids_digest,
    train_sisa,
)
from app.ml.training import fit
from app.ml.trees import is_tree
from app.ml.verify.membership import member_scores
from app.pipeline.spec import UnlearningConfig

CERT_STATE_PREFIX = "certstate-"
# Recorded in the job result of every approximate run on a monolithic model.
PREPROCESSOR_CAVEAT = (
    "approximate removal keeps the preprocessor as trained: its vocabularies and scaling "
    "may have been fitted with the forgotten rows (they are quantised; a retrain refits "
    "them on retained data only)"
)


def _tag(*parts: object) -> str:
    return hashlib.sha256(canonical_json([str(p) for p in parts]).encode()).hexdigest()[:40]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _xy(prep: PreprocessorState, data: TabularData, device: torch.device) -> tuple[Any, Any]:
    x = prep.transform(data.columns).to(device)
    y = torch.from_numpy(np.asarray(data.labels, dtype=np.int64)).to(device)
    return x, y


def _single_entry(manifest: SisaManifest) -> ShardEntry:
    if len(manifest.entries) != 1:
        raise ValueError("a monolithic model has exactly one shard")
    return manifest.entries[0]


def load_module(
    manifest: SisaManifest, store: CheckpointStore, device: torch.device
) -> tuple[nn.Module, PreprocessorState]:
    e = _single_entry(manifest)
    prep = PreprocessorState.from_dict(e.preprocessor)
    model = build_model(manifest.arch, prep.n_inputs, manifest.n_classes)
    tensors, _ = store.load(e.final_key)
    model.load_state_dict(tensors)
    return model.to(device), prep


def _with_entry(
    manifest: SisaManifest,
    entry: ShardEntry,
    device: torch.device,
    spec: FeatureSpec | None = None,
) -> SisaManifest:
    return replace(
        manifest,
        feature_spec=spec or manifest.feature_spec,
        entries=[entry],
        runtime=runtime_fingerprint(device),
    )


# -- certified logistic models ------------------------------------------------------------


def _save_certified(
    state: CertifiedState,
    prep: PreprocessorState,
    record_ids: np.ndarray,
    tag: str,
    store: CheckpointStore,
    meta: dict[str, Any],
) -> ShardEntry:
    """The servable module and the state the next removal needs, under one tag."""
    module_key, state_key = f"cert-{tag}", f"{CERT_STATE_PREFIX}{tag}"
    store.save(state_key, state.to_tensors(), state.meta())
    store.save(module_key, _tensors(to_module(state, prep.n_inputs)), meta)
    ids = np.sort(np.asarray(record_ids, dtype=np.int64))
    return ShardEntry(
        shard=0,
        final_key=module_key,
        checkpoint_keys=[state_key, module_key],
        preprocessor=prep.to_dict(),
        n_records=len(ids),
        record_ids=[int(v) for v in ids],
    )


def train_certified_manifest(
    data: TabularData,
    *,
    feature_spec: FeatureSpec,
    arch: ArchitectureConfig,
    training: TrainingConfig,
    sisa: SisaConfig,
    n_classes: int,
    model_key: str,
    cfg: CertifiedConfig,
    store: CheckpointStore,
    device: torch.device,
) -> tuple[SisaManifest, dict[str, Any]]:
    """Train from scratch with the loss perturbation; the preprocessor is fitted on
    exactly `data` (so a retrain never sees forgotten rows)."""
    cfg = cfg.for_rows(len(data))  # the default noise scale is fixed here, for good
    prep = fit_preprocessor(feature_spec, data.columns)
    x, y = _xy(prep, data, device)
    state = train_certified(x, y, cfg, derive_seed(training.seed, model_key, "certified"))
    tag = _tag(model_key, ids_digest(data.record_ids), prep.digest(), cfg.to_dict(), training)
    entry = _save_certified(
        state, prep, data.record_ids, tag, store, {"model_key": model_key, "certified": True}
    )
    manifest = SisaManifest(
        model_key=model_key,
        arch=arch,
        training=training,
        sisa=sisa,
        feature_spec=feature_spec,
        n_classes=n_classes,
        entries=[entry],
        runtime=runtime_fingerprint(device),
    )
    return manifest, {"certified": _state_summary(state), "config": cfg.to_dict()}


def _state_sigma(manifest: SisaManifest, store: CheckpointStore) -> float | None:
    """The noise scale a certified model's current state was trained with (None: no
    state, so the model's default applies)."""
    keys = [k for e in manifest.entries for k in e.checkpoint_keys]
    key = next((k for k in keys if k.startswith(CERT_STATE_PREFIX)), None)
    if key is None:
        return None
    _, meta = store.load(key)
    return sigma_of(meta)


def _state_summary(state: CertifiedState) -> dict[str, Any]:
    return {
        "cumulative_bound": state.cumulative_bound,
        "budget": state.budget,
        "budget_left": state.budget_left,
        "epsilon": state.epsilon,
        "delta": state.delta,
        "removals": state.removals,
    }


def _certified_unlearn(
    manifest: SisaManifest,
    retained: TabularData,
    forget: TabularData,
    *,
    u: UnlearningConfig,
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
) -> tuple[SisaManifest, dict[str, Any]]:
    e = _single_entry(manifest)
    state_key = next(k for k in e.checkpoint_keys if k.startswith(CERT_STATE_PREFIX))
    tensors, meta = store.load(state_key)
    state = CertifiedState.from_tensors({k: v.to(device) for k, v in tensors.items()}, meta)
    prep = PreprocessorState.from_dict(e.preprocessor)
    xr, yr = _xy(prep, retained, device)
    xf, yf = _xy(prep, forget, device)
    if len(retained) + len(forget) == state.n:
        new_state, removal = remove(state, xr, yr, xf, yf)
        if not removal.fallback_required:
            tag = _tag(e.final_key, job_id)
            entry = _save_certified(
                new_state, prep, retained.record_ids, tag, store, {"certified": True}
            )
            return _with_entry(manifest, entry, device), {
                "method": "certified",
                "approximate": True,
                "bound": removal.bound,
                "cumulative_bound": removal.cumulative_bound,
                "budget": removal.budget,
                "budget_left": removal.budget_left,
                "epsilon": removal.epsilon,
                "delta": removal.delta,
                "gradient_norm": removal.gradient_norm,
                "removed": removal.removed,
                "caveat": PREPROCESSOR_CAVEAT,
            }
        reason = "budget_exhausted"
        attempted: dict[str, Any] = removal.to_dict()
    else:
        reason, attempted = "row_count_mismatch", {"state_rows": state.n}
    # Fallback: retrain from scratch on the retained rows; the budget starts afresh under
    # the noise scale the model was trained with.
    cfg = u.certified_config(sigma=state.sigma)
    new, info = train_certified_manifest(
        retained,
        feature_spec=manifest.feature_spec,
        arch=manifest.arch,
        training=manifest.training,
        sisa=manifest.sisa,
        n_classes=manifest.n_classes,
        model_key=manifest.model_key,
        cfg=cfg,
        store=store,
        device=device,
    )
    fresh = info["certified"]
    return new, {
        "method": "retrain",
        "approximate": False,
        "fallback_reason": reason,
        "attempted_removal": attempted,
        "bound": attempted.get("bound"),
        "cumulative_bound": fresh["cumulative_bound"],
        "budget": fresh["budget"],
        "budget_left": fresh["budget_left"],
        "epsilon": fresh["epsilon"],
        "delta": fresh["delta"],
        "budget_reset": True,
    }


# -- approximate unlearning ---------------------------------------------------------------


def approximate_unlearn(
    manifest: SisaManifest,
    retained: TabularData,
    forget: TabularData,
    *,
    u: UnlearningConfig,
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
    progress: ProgressFn | None = None,
    test: TabularData | None = None,
    refs: SisaEnsemble | None = None,
    retrain_seconds: float | None = None,
) -> tuple[SisaManifest, dict[str, Any]]:
    """Forget `forget` from a monolithic model: certified removal or the model's strategy
    (strategy "auto": chosen by `app.ml.autotune.select` against the references `refs`
    on `test` rows, and reused by later jobs from the same trained state).

    The result's `method` is what was actually done ("retrain" when a certified budget
    ran out) and `approximate` says whether the lineage check can apply.
    """
    if u.certified:
        return _certified_unlearn(
            manifest, retained, forget, u=u, job_id=job_id, store=store, device=device
        )
    if is_tree(manifest.arch.kind):
        # The caller falls back to retraining, which is exact for trees.
        raise ValueError(f"approximate methods do not apply to {manifest.arch.kind} tree models")
    e = _single_entry(manifest)
    model, prep = load_module(manifest, store, device)
    name, params = u.strategy_name, u.strategy_params
    auto: dict[str, Any] | None = None
    if name == "auto":
        choice, reused = _auto_choice(
            model, prep, e.final_key, retained, forget, test, refs, retrain_seconds, store, device
        )
        name, params = choice.strategy, choice.params
        auto = choice.to_dict() | {"reused": reused}
    run = run_strategy(
        name,
        model,
        _xy(prep, forget, device),
        _xy(prep, retained, device),
        params=params,
        # From the model and the data (not the job's random id): the same request on
        # the same data and settings unlearns alike on any install.
        seed=derive_seed(
            manifest.training.seed,
            manifest.model_key,
            "unlearn",
            ids_digest(np.asarray(forget.record_ids, dtype=np.int64)),
        ),
        progress=progress,
    )
    key = f"mono-{_tag(e.final_key, job_id)}"
    store.save(key, _tensors(model), {"from": e.final_key, "job": job_id, "strategy": name})
    if auto is not None:
        _remember_auto(store, auto, [e.final_key, key])
    ids = np.sort(np.asarray(retained.record_ids, dtype=np.int64))
    entry = ShardEntry(0, key, [key], e.preprocessor, len(ids), [int(v) for v in ids])
    return _with_entry(manifest, entry, device), {
        "method": name,
        "approximate": True,
        "strategy": run.to_dict(),
        "caveat": PREPROCESSOR_CAVEAT,
        **({"auto": auto} if auto is not None else {}),
    }


AUTO_KEY = "auto-choice"


def _remember_auto(store: CheckpointStore, auto: dict[str, Any], keys: list[str]) -> None:
    """Keep the choice for later jobs from this trained state: valid for the weights it
    was made on and those unlearned from them (a full retrain's new weights are not)."""
    valid: list[str] = []
    if store.exists(AUTO_KEY):
        _, meta = store.load(AUTO_KEY)
        if meta.get("choice", {}).get("strategy") == auto["strategy"]:
            valid = list(meta.get("valid_for", []))
    choice = {k: v for k, v in auto.items() if k != "reused"}
    store.save(AUTO_KEY, {}, {"choice": choice, "valid_for": list(dict.fromkeys(valid + keys))})


def _auto_choice(
    model: torch.nn.Module,
    prep: PreprocessorState,
    final_key: str,
    retained: TabularData,
    forget: TabularData,
    test: TabularData | None,
    refs: SisaEnsemble | None,
    retrain_seconds: float | None,
    store: CheckpointStore,
    device: torch.device,
) -> tuple[AutoChoice, bool]:
    """The cached choice when these weights descend from the state it was made on (the
    data has not been retrained since), else a fresh validation search."""
    if store.exists(AUTO_KEY):
        _, meta = store.load(AUTO_KEY)
        if final_key in meta.get("valid_for", []):
            return AutoChoice.from_dict(meta["choice"]), True
    ref_acc: float | None = None
    ref_scores: np.ndarray | None = None
    if refs is not None and len(forget):
        ids = np.asarray(forget.record_ids, dtype=np.int64)
        hits, scores = [], []
        for s in refs.shards:
            out = ~np.isin(ids, np.asarray(refs.manifest.entry(s).record_ids, dtype=np.int64))
            if not out.any():
                continue
            rows = forget.take(np.flatnonzero(out))
            p = refs.shard_proba(rows.columns, s)
            hits.append((p.argmax(1).numpy() == rows.labels).astype(np.float64))
            scores.append(member_scores(p, rows.labels))
        if hits:
            ref_acc = float(np.concatenate(hits).mean())
            ref_scores = np.concatenate(scores)
    choice = select(
        model,
        _xy(prep, forget, device),
        _xy(prep, retained, device),
        _xy(prep, test if test is not None and len(test) else retained, device),
        reference_forget_accuracy=ref_acc,
        reference_forget_scores=ref_scores,
        retrain_seconds=retrain_seconds,
        seed=derive_seed(final_key, "auto"),
    )
    return choice, False


# -- feature removal ----------------------------------------------------------------------


def spec_without(spec: FeatureSpec, features: list[str]) -> FeatureSpec:
    removed = tuple(dict.fromkeys((*spec.removed, *features)))
    return replace(spec, removed=removed)


def feature_unlearn(
    manifest: SisaManifest,
    retained: TabularData,
    feature: str,
    *,
    u: UnlearningConfig,
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> tuple[SisaManifest, dict[str, Any]]:
    """Make a monolithic model structurally blind to `feature` (SISA models retrain every
    shard without the column, fanned out by `app.pipeline.fanout`). Binary logistic
    models get the second-order update, other networks zero-freeze-repair; certified models retrain
    (a cheap Newton solve that keeps the certificate's state consistent). Either way
    the preprocessor emits zeros for the feature afterwards.
    """
    spec = spec_without(manifest.feature_spec, [feature])
    if u.is_sisa:
        # Exact SISA feature removal retrains shard by shard as a Celery chord.
        raise ValueError("SISA feature removal runs through app.pipeline.fanout")
    if u.certified:
        new, info = train_certified_manifest(
            retained,
            feature_spec=spec,
            arch=manifest.arch,
            training=manifest.training,
            sisa=manifest.sisa,
            n_classes=manifest.n_classes,
            model_key=manifest.model_key,
            cfg=u.certified_config(sigma=_state_sigma(manifest, store)),
            store=store,
            device=device,
        )
        return new, {"method": "retrain", "approximate": False, **info["certified"]}
    entry, result = _entry_without_feature(
        manifest, _single_entry(manifest), retained, feature, job_id, store, device
    )
    return _with_entry(manifest, entry, device, spec), {"approximate": True, **result}


def approximate_sisa_feature(
    manifest: SisaManifest,
    retained: TabularData,
    shard_of: np.ndarray,
    feature: str,
    *,
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> tuple[SisaManifest, dict[str, Any]]:
    """SISA, approximate mode: the monolithic method applied to each shard's final model
    on that shard's retained rows. The slice checkpoints keep the feature, so they are
    dropped from the entries: a later exact unlearning of a shard restarts it from slice
    0 under the new feature spec (its preprocessor digest no longer matches)."""
    spec = spec_without(manifest.feature_spec, [feature])
    shard_of = np.asarray(shard_of, dtype=np.int64)
    entries: list[ShardEntry] = []
    per_shard: dict[str, Any] = {}
    for i, e in enumerate(manifest.entries):
        data = retained.take(np.flatnonzero(shard_of == e.shard))
        entry, result = _entry_without_feature(manifest, e, data, feature, job_id, store, device)
        entries.append(entry)
        per_shard[str(e.shard)] = result
        if progress is not None:
            progress((i + 1) / len(manifest.entries))
    new = replace(manifest, feature_spec=spec, entries=entries, runtime=runtime_fingerprint(device))
    return new, {"method": "feature_approximate", "approximate": True, "shards": per_shard}


def _entry_without_feature(
    manifest: SisaManifest,
    e: ShardEntry,
    data: TabularData,
    feature: str,
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
) -> tuple[ShardEntry, dict[str, Any]]:
    """One model made blind to `feature`: a second-order update for a binary logistic
    model, zero-freeze-repair otherwise; its preprocessor emits zeros for the feature."""
    prep = PreprocessorState.from_dict(e.preprocessor)
    model = build_model(manifest.arch, prep.n_inputs, manifest.n_classes)
    tensors, _ = store.load(e.final_key)
    model.load_state_dict(tensors)
    model = model.to(device)
    result: dict[str, Any]
    if isinstance(model, MediaModel):
        # The preprocessor empties the feature's inputs (a media column's whole block);
        # the head's weights on what they fed (the encoder's outputs for a media column)
        # are zeroed and frozen; then repair on the retained rows.
        new_prep = prep.with_removed(feature)
        x, y = _xy(new_prep, data, device)
        head_cols = (
            model.head_columns(feature)
            if feature in model.columns
            else model.head_index(prep.feature_columns(feature))
        )
        with torch.no_grad():
            input_layer(model).weight[:, head_cols] = 0.0
        seed = derive_seed(manifest.training.seed, manifest.model_key, "feature", job_id, e.shard)
        fit(model, x, y, manifest.training, seed, epochs=2, frozen_input_columns=head_cols)
        result = {"method": "feature_repair", "repair": {"columns": head_cols, "repair_epochs": 2}}
        key = f"mono-{_tag(e.final_key, job_id, feature)}"
        store.save(key, _tensors(model), {"from": e.final_key, "job": job_id, "feature": feature})
        return replace(
            e, final_key=key, checkpoint_keys=[key], preprocessor=new_prep.to_dict()
        ), result
    columns = prep.feature_columns(feature)
    x, y = _xy(prep, data, device)
    if isinstance(model, LogisticRegression) and manifest.n_classes == 2:
        lam = max(manifest.training.weight_decay, 1e-4)
        upd = linear_feature_update(model, x, y, columns, lam)
        result = {"method": "feature_linear", "lam": lam, "update": upd.to_dict()}
    else:
        seed = derive_seed(manifest.training.seed, manifest.model_key, "feature", feature, e.shard)
        rep = mlp_feature_removal(model, x, y, columns, manifest.training, seed)
        result = {"method": "feature_repair", "repair": rep.to_dict()}
    new_prep = prep.with_removed(feature)
    key = f"mono-{_tag(e.final_key, job_id, feature)}"
    store.save(key, _tensors(model), {"from": e.final_key, "job": job_id, "feature": feature})
    return replace(e, final_key=key, checkpoint_keys=[key], preprocessor=new_prep.to_dict()), result


# -- fallback retraining ------------------------------------------------------------------


def retrain(
    manifest: SisaManifest,
    retained: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    spec: FeatureSpec,
    *,
    u: UnlearningConfig,
    store: CheckpointStore,
    device: torch.device,
    progress: ProgressFn | None = None,
    sample_weight: np.ndarray | None = None,
    weights_changed: bool = False,
) -> tuple[SisaManifest, dict[str, Any]]:
    """From scratch on the retained records. SISA: only shards whose records changed
    (all of them when the feature spec changed, when the weights changed or when nothing
    changed: a retrain on demand). `sample_weight` (aligned with `retained`) reweights
    the loss: the fairness mitigation; `weights_changed` says it is not the weighting the
    shards were trained with, so a shard whose records are unchanged must learn it too
    (a withdrawal can empty the only shard whose records changed, and the flagged group's
    rows then all lie in shards that would otherwise be kept). Certified models ignore
    the weights (their guarantee is for the plain objective)."""
    common: dict[str, Any] = {
        "feature_spec": spec,
        "arch": manifest.arch,
        "training": manifest.training,
        "sisa": manifest.sisa,
        "n_classes": manifest.n_classes,
        "model_key": manifest.model_key,
        "store": store,
        "device": device,
    }
    if u.certified:
        cfg = u.certified_config(sigma=_state_sigma(manifest, store))
        new, info = train_certified_manifest(retained, cfg=cfg, **common)
        return new, {"method": "retrain", "shards": [0], **info["certified"]}
    shards: set[int] | None = None
    if u.is_sisa and spec == manifest.feature_spec and not weights_changed:
        ids = np.asarray(retained.record_ids, dtype=np.int64)
        changed = {
            e.shard
            for e in manifest.entries
            if not np.array_equal(
                np.sort(ids[np.asarray(shard_of) == e.shard]),
                np.sort(np.asarray(e.record_ids, dtype=np.int64)),
            )
        }
        shards = changed or None
    new = train_sisa(
        retained,
        shard_of,
        slice_of,
        shards_to_train=shards,
        previous=manifest if shards is not None else None,
        reuse=False,
        progress=progress,
        sample_weight=sample_weight,
        **common,
    )
    trained = sorted(shards) if shards is not None else list(range(manifest.sisa.shards))
    return new, {"method": "retrain", "shards": trained}
