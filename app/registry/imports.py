"""Models trained elsewhere: `POST /v1/model-imports` registers an externally trained
PyTorch network as a monolithic model's first version.

The upload is checked before anything is stored, each mismatch a 422 that says what
differs: the weights are safetensors (never a pickle), their tensor names, shapes and
dtype (float32) are those of the architecture built over the preprocessing's inputs, and
the network, under the preprocessing spec Palimpsest applies, reproduces the predictions
the admin sends for a sample of records; on a sample of the dataset its outputs are
finite probabilities. A job then records the version's lineage, trains the reference
models the forgetting check compares against on the retained data, and promotes it.
From then on the model forgets like any monolithic one: an approximate strategy, checks,
and a fallback retrain (Palimpsest's own, same architecture and input layout).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.errors import Conflict, Unprocessable
from app.core.storage import ArtifactStore
from app.datasets import service as datasets
from app.jobs import routing
from app.jobs.schemas import BatchingIn
from app.ml.architectures import build_model, probabilities
from app.ml.config import ArchitectureConfig, FeatureSpec
from app.ml.plugins import PluginError
from app.ml.preprocess import PreprocessorState
from app.ml.trees import is_tree
from app.models import MLModel, Record
from app.registry import architectures as architecture_check
from app.registry import artifacts
from app.registry.schemas import (
    AnyArchitectureIn,
    TrainingIn,
    UnlearningIn,
    VerificationIn,
)

IMPORT_METHOD = "import"  # the first job's method: app.pipeline.imports runs it (same name)
DATASET_SAMPLE = 512


class NumericIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str = Field(min_length=1, max_length=200)
    mean: float = Field(allow_inf_nan=False)
    scale: float = Field(gt=0, allow_inf_nan=False)


class CategoricalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str = Field(min_length=1, max_length=200)
    categories: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        min_length=1, max_length=10_000
    )


class PreprocessingIn(BaseModel):
    """What the model was trained on, in input order: each numeric column standardised
    as (x - mean) / scale (missing: 0), then each categorical column one-hot over its
    categories (an unknown or missing value: all zeros)."""

    model_config = ConfigDict(extra="forbid")
    numeric: list[NumericIn] = Field(default_factory=list, max_length=10_000)
    categorical: list[CategoricalIn] = Field(default_factory=list, max_length=1_000)

    def state(self) -> PreprocessorState:
        return PreprocessorState(
            numeric=tuple((n.column, n.mean, n.scale) for n in self.numeric),
            categorical=tuple((c.column, tuple(c.categories)) for c in self.categorical),
        )


class SamplePrediction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    record: dict[str, Any]
    # The model's class probabilities for `record`, in the dataset's label class order.
    probabilities: list[float] = Field(min_length=2, max_length=10_000)


class ImportUnlearningIn(BaseModel):
    """An imported model is monolithic: it forgets with an approximate strategy (checked,
    falling back to retraining); certified removal needs Palimpsest's own training."""

    model_config = ConfigDict(extra="forbid")
    strategy: str | None = Field(default=None, min_length=1, max_length=40)
    strategy_params: dict[str, Any] | None = None


class ModelImport(BaseModel):
    """The `spec` part of `POST /v1/model-imports`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    dataset_id: str = Field(min_length=1, max_length=64)
    architecture: AnyArchitectureIn
    preprocessing: PreprocessingIn
    # How Palimpsest trains this architecture itself: references, fallback retraining.
    training: TrainingIn = Field(default_factory=TrainingIn)
    unlearning: ImportUnlearningIn = Field(default_factory=ImportUnlearningIn)
    verification: VerificationIn = Field(default_factory=VerificationIn)
    group_columns: list[str] | None = None
    # The rows the model never saw: these sources' records (its held-out data); without,
    # Palimpsest's own test split (`test_fraction`, by record id) is taken as held out.
    held_out_sources: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.9)
    sample_predictions: list[SamplePrediction] = Field(min_length=1, max_length=1000)
    tolerance: float = Field(default=1e-4, gt=0, le=0.1)


class ImportChecks(BaseModel):
    tensors: int
    parameters: int
    sample_predictions: int
    max_abs_error: float
    dataset_sample_rows: int
    dataset_sample_accuracy: float | None


class ModelImported(BaseModel):
    id: str
    name: str
    status: str
    job_id: str
    checks: ImportChecks


def parse_spec(raw: str) -> ModelImport:
    """The multipart `spec` field: a 422 naming the first bad field, like a JSON body."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise Unprocessable(f"spec is not valid JSON: {exc}", code="invalid_spec") from exc
    if not isinstance(body, dict):
        raise Unprocessable("spec must be a JSON object", code="invalid_spec")
    try:
        return ModelImport.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "".join(f".{x}" for x in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise Unprocessable(f"spec{loc}: {msg}", code="invalid_spec") from exc


def _columns(spec: FeatureSpec, records: list[dict[str, Any]], where: str) -> dict[str, Any]:
    missing = sorted({c for c in spec.columns if any(c not in r for r in records)})
    if missing:
        raise Unprocessable(f"{where} lack feature columns: {missing[:10]}", code="missing_columns")
    out: dict[str, np.ndarray] = {}
    for name in spec.numeric:
        try:
            out[name] = np.asarray(
                [np.nan if r[name] is None else float(r[name]) for r in records], dtype=np.float64
            )
        except (TypeError, ValueError) as exc:
            raise Unprocessable(
                f"{where}: column {name!r} must be numeric", code="invalid_value"
            ) from exc
    for name in spec.categorical:
        out[name] = np.asarray(
            ["" if r[name] is None else str(r[name]) for r in records], dtype=object
        )
    return out


def _check_columns(body: ModelImport, schema: dict[str, Any]) -> FeatureSpec:
    prep = body.preprocessing
    numeric = [n.column for n in prep.numeric]
    categorical = [c.column for c in prep.categorical]
    columns = numeric + categorical
    if not columns:
        raise Unprocessable("preprocessing names no column", code="invalid_preprocessing")
    if len(set(columns)) != len(columns):
        raise Unprocessable("preprocessing names a column twice", code="invalid_preprocessing")
    unknown = [c for c in columns if c not in schema["feature_columns"]]
    if unknown:
        raise Unprocessable(
            f"preprocessing columns that are not feature columns of the dataset: {unknown}",
            code="invalid_columns",
        )
    wrong = [c for c in numeric if c not in schema["numeric_columns"]] + [
        c for c in categorical if c not in schema["categorical_columns"]
    ]
    if wrong:
        raise Unprocessable(
            f"preprocessing treats these columns as another kind than the dataset does "
            f"(numeric vs categorical): {wrong}",
            code="invalid_preprocessing",
        )
    for c in prep.categorical:
        if len(set(c.categories)) != len(c.categories):
            raise Unprocessable(
                f"categories of {c.column!r} repeat a value", code="invalid_preprocessing"
            )
    # A fallback retrain keeps the same input layout: the vocabularies are pinned.
    return FeatureSpec(
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        fixed_categories={c.column: tuple(c.categories) for c in prep.categorical},
    )


def _load_weights(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        return dict(st_load(blob))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise Unprocessable(
            f"weights are not a safetensors file ({exc}); export them with "
            "safetensors.torch.save_file(model.state_dict(), path)",
            code="invalid_weights",
        ) from exc


def _check_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise Unprocessable(
            f"the weights do not fit the architecture: missing tensors {missing[:10]}, "
            f"unexpected tensors {unexpected[:10]}",
            code="weights_mismatch",
        )
    shapes = [
        f"{k}: expected {tuple(v.shape)}, got {tuple(tensors[k].shape)}"
        for k, v in sorted(expected.items())
        if tuple(v.shape) != tuple(tensors[k].shape)
    ]
    if shapes:
        raise Unprocessable(
            "tensor shapes do not fit the architecture over the preprocessing's "
            f"inputs: {shapes[:10]}",
            code="weights_mismatch",
        )
    dtypes = [
        f"{k}: {t.dtype}"
        for k, t in sorted(tensors.items())
        if expected[k].dtype.is_floating_point and t.dtype != torch.float32
    ]
    if dtypes:
        raise Unprocessable(
            f"weights must be float32 (as Palimpsest trains and serves them): {dtypes[:10]}",
            code="weights_dtype",
        )
    bad = [
        k for k, t in sorted(tensors.items()) if t.is_floating_point() and not t.isfinite().all()
    ]
    if bad:
        raise Unprocessable(
            f"tensors with NaN or infinite values: {bad[:10]}", code="invalid_weights"
        )


def _run(module: torch.nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            return probabilities(module(x))
    except Exception as exc:  # the uploaded network's own failure: the upload's fault
        raise Unprocessable(
            f"the model failed on {what}: {type(exc).__name__}: {exc}", code="predictions_invalid"
        ) from exc


def _check_samples(
    module: torch.nn.Module,
    prep: PreprocessorState,
    spec: FeatureSpec,
    body: ModelImport,
    n_classes: int,
) -> float:
    records = [s.record for s in body.sample_predictions]
    x = prep.transform(_columns(spec, records, "sample_predictions records"))
    got = _run(module, x, "the sample_predictions records").to(torch.float64).numpy()
    worst = 0.0
    for i, s in enumerate(body.sample_predictions):
        if len(s.probabilities) != n_classes:
            raise Unprocessable(
                f"sample_predictions[{i}] gives {len(s.probabilities)} probabilities; the "
                f"dataset has {n_classes} classes",
                code="invalid_sample",
            )
        want = np.asarray(s.probabilities, dtype=np.float64)
        err = float(np.max(np.abs(want - got[i])))
        worst = max(worst, err)
        if not err <= body.tolerance:
            raise Unprocessable(
                f"sample_predictions[{i}]: expected {np.round(want, 6).tolist()}, the uploaded "
                f"weights under the given preprocessing give {np.round(got[i], 6).tolist()} "
                f"(max abs error {err:.3g} > tolerance {body.tolerance:g}): the weights, the "
                "architecture or the preprocessing differ from what was trained",
                code="predictions_mismatch",
            )
    return worst


def _dataset_sample(
    session: Session,
    module: torch.nn.Module,
    prep: PreprocessorState,
    store: ArtifactStore,
    ds: Any,
) -> tuple[int, float | None]:
    """The model on the dataset's first active rows (one partition held at a time)."""
    ids = np.asarray(
        session.scalars(
            select(Record.id)
            .where(Record.dataset_id == ds.id, Record.status == "active")
            .order_by(Record.id)
            .limit(DATASET_SAMPLE)
        ).all(),
        dtype=np.int64,
    )
    if len(ids) == 0:
        return 0, None
    data = datasets.to_tabular(ds, datasets.read_rows(store, ds, ids), ids)
    p = _run(module, prep.transform(data.columns), "rows of the dataset")
    if not bool(torch.isfinite(p).all()):
        raise Unprocessable(
            "the model gives non-finite outputs on rows of the dataset", code="predictions_invalid"
        )
    acc = float((p.argmax(dim=1).numpy() == data.labels).mean())
    return len(data), acc


def import_model(
    session: Session, store: ArtifactStore, body: ModelImport, weights: bytes, actor: str
) -> ModelImported:
    if session.scalars(select(MLModel).where(MLModel.name == body.name)).first() is not None:
        raise Conflict(f"a model named {body.name!r} already exists", code="model_exists")
    ds = datasets.get(session, body.dataset_id)
    datasets.require_ready(ds)
    schema = ds.schema
    kind = body.architecture.kind
    if is_tree(kind):
        raise Unprocessable(
            f"an imported model is a PyTorch network; {kind!r} tree models are trained by "
            "Palimpsest (POST /v1/models)",
            code="invalid_architecture",
        )
    spec = _check_columns(body, schema)
    groups = body.group_columns if body.group_columns is not None else list(schema["group_columns"])
    known = set(schema["group_columns"]) | set(schema["feature_columns"])
    if [g for g in groups if g not in known]:
        raise Unprocessable(
            f"unknown group columns: {[g for g in groups if g not in known]}",
            code="invalid_columns",
        )
    if body.held_out_sources is not None:
        held = set(datasets.to_out(session, ds).sources)
        unknown_src = sorted(set(body.held_out_sources) - held)
        if unknown_src:
            raise Unprocessable(
                f"held_out_sources not in the dataset: {unknown_src[:10]}", code="invalid_sources"
            )
    from app.registry.service import _check_strategy

    _check_strategy(body.unlearning.strategy, body.unlearning.strategy_params)
    n_classes = len(schema["label_classes"])
    prep = body.preprocessing.state()
    arch_body = body.architecture.stored()
    arch = ArchitectureConfig.from_dict(arch_body)
    if not arch.builtin:
        try:
            architecture_check.check_plugin_kind(kind, prep.n_inputs, n_classes, arch.params)
        except PluginError as exc:
            raise Unprocessable(str(exc), code="architecture_plugin") from exc
    module = build_model(arch, prep.n_inputs, n_classes)
    tensors = _load_weights(weights)
    _check_weights(module, tensors)
    module.load_state_dict(tensors)
    module.eval()
    worst = _check_samples(module, prep, spec, body, n_classes)
    rows, acc = _dataset_sample(session, module, prep, store, ds)
    checks = ImportChecks(
        tensors=len(tensors),
        parameters=sum(int(t.numel()) for t in tensors.values()),
        sample_predictions=len(body.sample_predictions),
        max_abs_error=worst if math.isfinite(worst) else 0.0,
        dataset_sample_rows=rows,
        dataset_sample_accuracy=acc,
    )
    sha = hashlib.sha256(weights).hexdigest()
    unlearning = UnlearningIn(
        mode="monolithic",
        shards=1,
        slices=1,
        strategy=body.unlearning.strategy,
        strategy_params=body.unlearning.strategy_params,
    )
    training = body.training.model_dump(mode="json") | {"schedule": "per_record"}
    config: dict[str, Any] = {
        "name": body.name,
        "dataset_id": ds.id,
        "architecture": arch_body,
        "training": training,
        "unlearning": unlearning.model_dump(mode="json"),
        "feature_columns": list(spec.columns),
        "group_columns": groups,
        "test_fraction": body.test_fraction,
        "verification": body.verification.model_dump(mode="json"),
        "batching": BatchingIn().model_dump(mode="json"),
        "resolved": {
            "feature_spec": spec.to_dict(),
            "label_classes": schema["label_classes"],
            "removed_features": [],
        },
    }
    model = MLModel(name=body.name, dataset_id=ds.id, config=config, status="training")
    session.add(model)
    session.flush()
    key = f"import-{sha[:40]}"
    artifacts.checkpoint_store(store, model.id).save(
        key,
        {k: v.contiguous() for k, v in tensors.items()},
        {"imported": True, "sha256": sha, "model_key": model.id, "arch": arch.to_dict()},
    )
    model.config = {
        **config,
        "imported": {
            "checkpoint": key,
            "sha256": sha,
            "preprocessor": prep.to_dict(),
            "held_out_sources": body.held_out_sources,
            "checks": checks.model_dump(),
        },
    }
    job = routing.create(session, kind="train", model_id=model.id, method=IMPORT_METHOD)
    audit.record(
        session,
        actor=actor,
        action="model.imported",
        entity_type="model",
        entity_id=model.id,
        data={"name": model.name, "dataset_id": ds.id, "job_id": job.id, "sha256": sha},
    )
    return ModelImported(
        id=model.id, name=model.name, status=model.status, job_id=job.id, checks=checks
    )
