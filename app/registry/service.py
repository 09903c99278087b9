"""Models and versions: creation, views, promotion and serving."""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.errors import BadRequest, Conflict, NotFound, Unprocessable
from app.core.settings import get_settings
from app.core.storage import ArtifactStore, get_store
from app.datasets import service as datasets
from app.integrations import mlflow_mirror
from app.jobs import batching, routing
from app.ml import encoders, media
from app.ml.approximate import DEFAULT_STRATEGY, STRATEGIES, get_strategy, params_from
from app.ml.config import BUILTIN_NETWORKS, ArchitectureConfig, FeatureSpec
from app.ml.encoders import EncoderSpec, resolve
from app.ml.thresholds import decide
from app.models import Job, MLModel, ModelVersion
from app.registry import architectures as architecture_check
from app.registry import artifacts
from app.registry.schemas import (
    ArchitectureIn,
    ModelCreate,
    ModelCreated,
    ModelOut,
    ModelPatch,
    Prediction,
    PredictOut,
    VersionOut,
)
from app.webhooks import service as webhooks


def get_by_name(session: Session, name: str) -> MLModel:
    model = session.scalars(select(MLModel).where(MLModel.name == name)).first()
    if model is None:
        raise NotFound(f"no model named {name!r}", code="model_not_found")
    return model


def get_version(session: Session, model: MLModel, version: int) -> ModelVersion:
    mv = session.scalars(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    ).first()
    if mv is None:
        raise NotFound(f"model {model.name!r} has no version {version}", code="version_not_found")
    return mv


def create(session: Session, body: ModelCreate, actor: str) -> ModelCreated:
    if session.scalars(select(MLModel).where(MLModel.name == body.name)).first() is not None:
        raise Conflict(f"a model named {body.name!r} already exists", code="model_exists")
    ds = datasets.get(session, body.dataset_id)
    datasets.require_ready(ds)
    schema = ds.schema
    features = body.feature_columns or list(schema["feature_columns"])
    unknown = [f for f in features if f not in schema["feature_columns"]]
    if unknown:
        raise Unprocessable(
            f"not feature columns of dataset {ds.name!r}: {unknown}", code="invalid_columns"
        )
    if len(set(features)) != len(features) or not features:
        raise Unprocessable(
            "feature_columns must be non-empty and without duplicates", code="invalid_columns"
        )
    groups = body.group_columns if body.group_columns is not None else list(schema["group_columns"])
    known = set(schema["group_columns"]) | set(schema["feature_columns"])
    bad_groups = [g for g in groups if g not in known]
    if bad_groups:
        raise Unprocessable(f"unknown group columns: {bad_groups}", code="invalid_columns")
    arch_check = architecture_check.check(body, schema, features)
    if body.unlearning.certified and (not arch_check.linear or len(schema["label_classes"]) != 2):
        raise Unprocessable(
            "certified removal needs a binary logistic model (logreg, or a plugin that "
            f"declares itself linear); {body.architecture.kind!r} is not one",
            code="invalid_config",
        )
    if body.unlearning.certified:
        body.unlearning.mode = "monolithic"  # certified removal is for one model
    _check_strategy(body.unlearning.strategy, body.unlearning.strategy_params)
    if body.unlearning.mode == "monolithic" and (
        body.unlearning.shards,
        body.unlearning.slices,
    ) != (1, 1):
        body.unlearning.shards, body.unlearning.slices = 1, 1
    encoders = _resolve_encoders(schema, features, body)
    spec = FeatureSpec(
        numeric=tuple(f for f in features if f in schema["numeric_columns"]),
        categorical=tuple(f for f in features if f in schema["categorical_columns"]),
        media=encoders,
    )
    config: dict[str, Any] = body.model_dump(mode="json")
    if arch_check.stored is not None:  # a tree or plugin: its body as given
        config["architecture"] = {k: v for k, v in arch_check.stored.items() if k != "encoders"}
    config["architecture"].pop("encoders", None)
    if encoders:  # resolved, defaults filled in: the network and its inputs' layout
        config["architecture"]["encoders"] = ArchitectureConfig(encoders=encoders).to_dict()[
            "encoders"
        ]
    # A new model's `epochs` are passes over each record (app.ml.schedule); a stored
    # config without `schedule` is a model created before, trained per stage.
    config["training"]["schedule"] = "per_record"
    config["feature_columns"] = features
    config["group_columns"] = groups
    config["resolved"] = {
        "feature_spec": spec.to_dict(),
        "label_classes": schema["label_classes"],
        "removed_features": [],
    }
    model = MLModel(name=body.name, dataset_id=ds.id, config=config, status="training")
    session.add(model)
    session.flush()
    job = routing.create(session, kind="train", model_id=model.id, method=body.unlearning.mode)
    audit.record(
        session,
        actor=actor,
        action="model.created",
        entity_type="model",
        entity_id=model.id,
        data={"name": model.name, "dataset_id": ds.id, "job_id": job.id},
    )
    return ModelCreated(id=model.id, name=model.name, status=model.status, job_id=job.id)


def _resolve_encoders(
    schema: dict[str, Any], features: list[str], body: ModelCreate
) -> tuple[EncoderSpec, ...]:
    """The encoder of every media feature: its kind's default or the body's override."""
    media_cols: dict[str, str] = schema.get("media_columns", {})
    # Only a built-in head reads encoded media (a tree's or plugin's body is its own).
    arch = body.architecture
    overrides = (arch.encoders if isinstance(arch, ArchitectureIn) else None) or {}
    bad = [c for c in overrides if c not in media_cols or c not in features]
    if bad:
        raise Unprocessable(
            f"architecture.encoders names columns that are not text, image or audio "
            f"features of the model: {bad}",
            code="invalid_config",
        )
    out: list[EncoderSpec] = []
    for c in features:
        if c in media_cols:
            try:
                out.append(resolve(c, media_cols[c], overrides.get(c)))
            except ValueError as exc:
                raise Unprocessable(
                    f"architecture.encoders.{c}: {exc}", code="invalid_config"
                ) from exc
    if out and body.architecture.kind not in BUILTIN_NETWORKS:
        raise Unprocessable(
            f"text, image and audio columns are read by Palimpsest's encoders ahead of a "
            f"built-in head (logreg or mlp); {body.architecture.kind!r} is not one",
            code="invalid_config",
        )
    if out and body.unlearning.certified:
        raise Unprocessable(
            "certified removal needs a logistic model over tabular inputs; this model reads "
            "media columns",
            code="invalid_config",
        )
    return tuple(out)


def _check_strategy(strategy_name: str | None, overrides: dict[str, Any] | None) -> None:
    """The strategy exists and its parameters are in range: a bad value would otherwise
    surface only when an erasure runs, and fail every request on the model."""
    if strategy_name is None and overrides is None:
        return
    if strategy_name == "auto":
        # A validation search picks the strategy and its parameters per job.
        if overrides:
            raise Unprocessable(
                "strategy 'auto' chooses its own parameters: give no strategy_params",
                code="invalid_config",
            )
        return
    try:
        strategy = get_strategy(strategy_name or DEFAULT_STRATEGY)
    except KeyError as exc:
        raise Unprocessable(
            f"unknown strategy {strategy_name!r}; known: {sorted(STRATEGIES)}",
            code="unknown_strategy",
        ) from exc
    try:
        params_from(strategy.params_type, overrides)
    except (TypeError, ValueError) as exc:
        raise Unprocessable(
            f"invalid strategy_params for {strategy.name!r}: {exc}", code="invalid_config"
        ) from exc


def request_retrain(session: Session, model: MLModel, actor: str) -> str:
    """An admin's retrain on demand: from scratch on the retained records."""
    if model.production_version is None:
        raise Conflict(f"model {model.name!r} has no production version yet", code="not_ready")
    pending = session.scalars(
        select(Job).where(
            Job.model_id == model.id, Job.kind == "retrain", Job.status.in_(("pending", "running"))
        )
    ).first()
    if pending is not None:
        return pending.id
    job = routing.create_retrain(session, model.id, "admin")
    audit.record(
        session,
        actor=actor,
        action="model.retrain_requested",
        entity_type="model",
        entity_id=model.id,
        data={"model": model.name, "job_id": job.id},
    )
    return job.id


def to_out(session: Session, model: MLModel) -> ModelOut:
    versions = session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version)
    ).all()
    return ModelOut(
        id=model.id,
        name=model.name,
        status=model.status,
        production_version=model.production_version,
        dataset_id=model.dataset_id,
        config={k: v for k, v in model.config.items() if k != "resolved"}
        | {"removed_features": model.config["resolved"].get("removed_features", [])},
        versions=[
            VersionOut(
                version=v.version,
                status=v.status,
                created_at=v.created_at,
                created_by_job=v.created_by_job,
                metrics=v.metrics,
            )
            for v in versions
        ],
    )


def update_settings(session: Session, model: MLModel, body: ModelPatch, actor: str) -> None:
    """Replace the model's batching policy (held jobs are rescheduled under the new one)
    and/or the changeable keys of its unlearning block (used by the next job)."""
    config = dict(model.config)
    changes: dict[str, Any] = {}
    if body.unlearning is not None:
        given = body.unlearning.model_dump(include=body.unlearning.model_fields_set)
        unlearning = {**config["unlearning"], **given}
        _check_strategy(unlearning.get("strategy"), unlearning.get("strategy_params"))
        changes["unlearning"] = {"before": config["unlearning"], "after": unlearning}
        config["unlearning"] = unlearning
    if body.batching is not None:
        changes["batching"] = {
            "before": config.get("batching"),
            "after": body.batching.model_dump(),
        }
        config["batching"] = body.batching.model_dump()
    if not changes:
        return
    model.config = config
    audit.record(
        session,
        actor=actor,
        action="model.settings_changed",
        entity_type="model",
        entity_id=model.id,
        data=changes,
    )
    session.flush()
    if body.batching is not None:
        batching.reschedule_model(session, model)


def promote(session: Session, model: MLModel, mv: ModelVersion, actor: str, reason: str) -> None:
    """Make `mv` production. A purged version (trained on erased data) never comes back."""
    if mv.status == "purged":
        raise Conflict(
            f"version {mv.version} was trained on erased data and its artifacts are gone",
            code="version_purged",
        )
    if mv.status == "production":
        return
    if reason == "manual":
        # A completed feature request is a promise: no rollback to a version that still
        # reads the removed column.
        gone = {d["feature"] for d in model.config["resolved"].get("removed_features", [])}
        kept = {d["feature"] for d in (mv.schema or {}).get("removed_features", [])}
        if gone - kept:
            raise Conflict(
                f"version {mv.version} still uses removed feature(s) {sorted(gone - kept)}",
                code="feature_removed",
            )
    if model.locked_by_job is not None and reason == "manual":
        raise Conflict(
            "a job is running on this model; try again when it finishes", code="model_busy"
        )
    previous = model.production_version
    if previous is not None:
        old = get_version(session, model, previous)
        old.status = "retired"
    mv.status = "production"
    model.production_version = mv.version
    if previous is not None and old.erased_data:
        # No rollback may bring back weights derived from erased records.
        purge_versions(session, get_store(), model.id, {previous}, actor)
    if "features" in mv.schema:
        # The serving version defines which features the model is blind to.
        resolved = dict(model.config["resolved"])
        resolved["feature_spec"] = mv.schema["features"]
        resolved["removed_features"] = list(mv.schema.get("removed_features", []))
        model.config = {**model.config, "resolved": resolved}
    audit.record(
        session,
        actor=actor,
        action="model.promoted",
        entity_type="model",
        entity_id=model.id,
        data={
            "model": model.name,
            "from_version": previous,
            "to_version": mv.version,
            "reason": reason,
        },
    )
    webhooks.model_promoted(session, model, previous, mv.version, reason)
    mlflow_mirror.mark(session, model)  # the MLflow alias follows (when configured)


# -- serving ------------------------------------------------------------------------

_cache: dict[tuple[str, int], artifacts.Predictor] = {}
_cache_lock = threading.Lock()


def _predictor(store: ArtifactStore, model: MLModel, mv: ModelVersion) -> artifacts.Predictor:
    key = (model.id, mv.version)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    pred = artifacts.load_predictor(store, mv.manifest, get_settings().device)
    with _cache_lock:
        for k in [k for k in _cache if k[0] == model.id]:
            del _cache[k]  # one version per model in memory: the production one
        _cache[key] = pred
    return pred


def _columns(model: MLModel, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    spec = FeatureSpec.from_dict(model.config["resolved"]["feature_spec"])
    # Removed features are zeroed by the preprocessor: callers need not send them.
    records = (
        [{**{c: None for c in spec.removed}, **r} for r in records] if spec.removed else records
    )
    missing = sorted({c for c in spec.columns if any(c not in r for r in records)})
    if missing:
        raise Unprocessable(f"records lack feature columns: {missing[:10]}", code="missing_columns")
    out: dict[str, np.ndarray] = {}
    for name in spec.numeric:
        try:
            out[name] = np.asarray(
                [np.nan if r[name] is None else float(r[name]) for r in records], dtype=np.float64
            )
        except (TypeError, ValueError) as exc:
            raise Unprocessable(f"column {name!r} must be numeric", code="invalid_value") from exc
    for name in spec.categorical:
        out[name] = np.asarray(
            ["" if r[name] is None else str(r[name]) for r in records], dtype=object
        )
    for enc in spec.media:
        out[enc.column] = _media_values(enc, [r[enc.column] for r in records])
    return out


def _media_values(enc: EncoderSpec, values: list[Any]) -> np.ndarray:
    """Text as strings; image and audio as base64 of the file's bytes, decoded and
    checked as ingest checks them (422 naming the record otherwise)."""
    limits = media.MediaLimits(
        max_file_bytes=get_settings().media_max_file_bytes,
        max_image_pixels=get_settings().media_max_image_pixels,
        max_audio_seconds=get_settings().media_max_audio_seconds,
    )
    out: list[Any] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, str):
            raise Unprocessable(f"records[{i}].{enc.column} must be a string", code="invalid_value")
        if enc.kind == "text_bag":
            out.append(v)
            continue
        try:
            data = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Unprocessable(
                f"records[{i}].{enc.column} is not base64", code="invalid_media"
            ) from exc
        try:
            encoders.block([data], enc, limits)
        except media.MediaError as exc:
            raise Unprocessable(f"records[{i}].{enc.column}: {exc}", code="invalid_media") from exc
        out.append(data)
    arr = np.empty(len(out), dtype=object)
    arr[:] = out
    return arr


def predict(
    session: Session, store: ArtifactStore, model: MLModel, records: list[dict[str, Any]]
) -> PredictOut:
    if model.production_version is None:
        raise BadRequest(f"model {model.name!r} has no production version yet", code="not_ready")
    mv = get_version(session, model, model.production_version)
    predictor = _predictor(store, model, mv)
    columns = _columns(model, records)
    proba = predictor.predict_proba(columns)
    classes: list[str] = model.config["resolved"]["label_classes"]
    # A version with per-group decision thresholds (a post-processing mitigation)
    # decides with them; the group column is read from the records.
    table = getattr(getattr(predictor, "manifest", None), "thresholds", None) or {}
    if table.get("column") and table["column"] not in columns:
        columns[table["column"]] = np.asarray(
            [str(r.get(table["column"], "")) for r in records], dtype=object
        )
    best = decide(predictor, proba, columns)
    preds = []
    for i in range(len(records)):
        label = int(best[i])
        # Binary: the score is P(second class), the usual "positive" score; otherwise
        # the probability of the predicted class.
        score = float(proba[i, 1]) if len(classes) == 2 else float(proba[i, label])
        preds.append(Prediction(label=classes[label], score=score))
    return PredictOut(version=mv.version, predictions=preds)


def purge_versions(
    session: Session, store: ArtifactStore, model_id: str, versions: set[int], actor: str
) -> None:
    """Delete the artifacts of non-production versions in `versions`; checkpoints still
    used by a surviving version stay (they never saw the erased records). A production
    version in `versions` (an approximate result) is marked and purged when retired."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.model_id == model_id)).all()
    for v in rows:
        if v.version in versions and v.status == "production":
            v.erased_data = True
    doomed = [v for v in rows if v.version in versions and v.status not in ("production", "purged")]
    if not doomed:
        return
    keep: set[str] = set()
    for v in rows:
        if v not in doomed and v.status != "purged":
            for e in v.manifest.get("entries", []):
                keep.update(e.get("checkpoint_keys", []))
    ckpt = artifacts.checkpoint_store(store, model_id)
    for v in doomed:
        for e in v.manifest.get("entries", []):
            for key in e.get("checkpoint_keys", []):
                if key not in keep:
                    ckpt.delete(key)
        if v.manifest_path:
            store.delete(v.manifest_path)
        v.status = "purged"
        if (mirrored := session.get(MLModel, model_id)) is not None:
            mlflow_mirror.mark(session, mirrored)  # deleted from MLflow too
        audit.record(
            session,
            actor=actor,
            action="model.version_purged",
            entity_type="model",
            entity_id=model_id,
            data={"version": v.version},
        )
