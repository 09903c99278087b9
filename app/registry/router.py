"""`/v1/models`: create (train), view, predict, promote."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, UploadFile

from app.api.deps import AdminDep, ReaderDep, SessionDep, SettingsDep
from app.core.errors import PayloadTooLarge
from app.core.storage import get_store
from app.registry import imports, service
from app.registry.schemas import (
    ModelCreate,
    ModelCreated,
    ModelOut,
    ModelPatch,
    PredictIn,
    PredictOut,
)

router = APIRouter(prefix="/v1/models", tags=["models"])
# Beyond API.md (issue 14): its own path, so that no model name ("import") shadows it.
imports_router = APIRouter(prefix="/v1/model-imports", tags=["models"])
# Versions are 32-bit integers in the database; a larger one names no version.
MAX_VERSION = 2**31 - 1


@router.post("", status_code=202, responses={404: {}, 409: {}, 422: {}})
def create_model(body: ModelCreate, caller: AdminDep, session: SessionDep) -> ModelCreated:
    return service.create(session, body, caller.actor)


@router.get("/{name}", responses={404: {}})
def get_model(name: str, _: ReaderDep, session: SessionDep) -> ModelOut:
    return service.to_out(session, service.get_by_name(session, name))


@router.patch("/{name}", responses={404: {}, 422: {}})
def update_model(name: str, body: ModelPatch, caller: AdminDep, session: SessionDep) -> ModelOut:
    """Beyond API.md: change settings that may change after creation (batching, and how
    later jobs unlearn: strategy, strategy_params, feature_mode)."""
    model = service.get_by_name(session, name)
    service.update_settings(session, model, body, caller.actor)
    return service.to_out(session, model)


@router.post("/{name}/predict", responses={400: {}, 404: {}, 422: {}})
def predict(
    name: str, body: PredictIn, _: AdminDep, session: SessionDep, settings: SettingsDep
) -> PredictOut:
    model = service.get_by_name(session, name)
    return service.predict(session, get_store(settings), model, body.records)


@router.post("/{name}/versions/{version}/promote", responses={404: {}, 409: {}})
def promote(
    name: str,
    version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
    caller: AdminDep,
    session: SessionDep,
) -> ModelOut:
    model = service.get_by_name(session, name)
    mv = service.get_version(session, model, version)
    service.promote(session, model, mv, caller.actor, reason="manual")
    return service.to_out(session, model)


@router.post("/{name}/retrain", status_code=202, responses={404: {}, 409: {}})
def retrain(name: str, caller: AdminDep, session: SessionDep) -> dict[str, str]:
    """Fallback retraining on demand: from scratch on the retained records."""
    model = service.get_by_name(session, name)
    return {"job_id": service.request_retrain(session, model, caller.actor)}


@imports_router.post("", status_code=202, responses={404: {}, 409: {}, 413: {}, 422: {}})
def import_model(
    caller: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    weights: Annotated[
        UploadFile, File(description="the network's state_dict as safetensors (never a pickle)")
    ],
    spec: Annotated[str, Form(description="JSON: the import spec (ModelImport)")],
) -> imports.ModelImported:
    """Beyond API.md: register a PyTorch model trained elsewhere as a monolithic model's
    first version (docs/byo-models.md). Every mismatch between the weights, the
    architecture, the preprocessing and the sample predictions is a 422 saying what
    differs; a job then trains the references and promotes version 1."""
    body = imports.parse_spec(spec)
    blob = weights.file.read(settings.max_upload_bytes + 1)
    if len(blob) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"weights exceed {settings.max_upload_bytes} bytes", code="upload_too_large"
        )
    return imports.import_model(session, get_store(settings), body, blob, caller.actor)
