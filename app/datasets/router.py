"""`/v1/datasets`: multipart ingest (admin)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminDep, Caller, ReaderDep, SessionDep, SettingsDep
from app.core import outbox
from app.core.errors import Unprocessable
from app.core.settings import Settings
from app.core.storage import ArtifactStore, get_store
from app.datasets import archive, service
from app.datasets.schemas import DatasetAccepted, DatasetOut, DatasetSpec
from app.datasets.upload import MAX_SPEC_BYTES, Upload, receive

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def parse_spec(raw: str) -> DatasetSpec:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"spec is not valid JSON: {exc.msg}", code="invalid_spec") from exc
    except RecursionError as exc:
        raise Unprocessable("spec is nested too deeply", code="invalid_spec") from exc
    if not isinstance(body, dict):
        raise Unprocessable("spec must be a JSON object", code="invalid_spec")
    try:
        return DatasetSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "".join(f".{x}" for x in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise Unprocessable(f"spec{loc}: {msg}", code="invalid_spec") from exc


# FastAPI cannot describe a body the endpoint reads itself: the form, as it would be.
_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "spec"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "CSV, Parquet or a zip archive (manifest.csv or "
                        "manifest.parquet "
                        "and the media files it names), at most PALIMPSEST_MAX_UPLOAD_BYTES",
                    },
                    "spec": {
                        "type": "string",
                        "maxLength": MAX_SPEC_BYTES,
                        "description": "JSON dataset spec",
                    },
                },
            }
        }
    },
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        202: {
            "model": DatasetAccepted,
            "description": "A file larger than PALIMPSEST_INLINE_INGEST_BYTES: a worker job "
            "ingests it; poll GET /v1/datasets/{id} (or the job) until `status` is ready.",
        },
        409: {},
        413: {"description": "The file is larger than PALIMPSEST_MAX_UPLOAD_BYTES."},
        422: {},
    },
    openapi_extra={"requestBody": _BODY},
)
async def create_dataset(
    request: Request, caller: AdminDep, session: SessionDep, settings: SettingsDep
) -> Any:
    """Small files are ingested in the request (201 with the dataset); larger ones are
    staged and ingested by a worker job (202 with `status: ingesting` and `job_id`)."""
    # The caller is known: end the read transaction now, so that no connection (on
    # SQLite, no write lock) is held while the body arrives, however slowly.
    await run_in_threadpool(session.commit)
    store = get_store(settings)
    upload = await receive(request, store, settings.max_upload_bytes)
    result = await run_in_threadpool(_create, session, store, settings, caller, upload)
    if isinstance(result, DatasetAccepted):
        return JSONResponse(result.model_dump(), status_code=202)
    return result


def _create(
    session: Session, store: ArtifactStore, settings: Settings, caller: Caller, upload: Upload
) -> DatasetOut | DatasetAccepted:
    """The staged upload ends ingested, staged for a job, or deleted."""
    try:
        spec = parse_spec(upload.spec)
        # Archives and image/audio columns are ingested here whatever their size (their
        # files are decoded and checked one by one); other large files by a worker job.
        media = bool(spec.image_columns or spec.audio_columns) or upload.filename.lower().endswith(
            ".zip"
        )
        if upload.size <= settings.inline_ingest_bytes or media:
            data = store.read_bytes(upload.path)
            store.delete(upload.path)
            archive.media_columns(spec)  # a column declared of two kinds is a 422
            mt = archive.read_upload(data, upload.filename, spec, settings)
            table = archive.check_media(mt, spec, settings)
            return service.ingest(session, store, settings, spec, table, caller.actor)
        accepted = service.stage(
            session, spec, upload.path, upload.filename, upload.size, caller.actor
        )
    except BaseException:
        store.delete(upload.path)
        raise
    outbox.on_rollback(session, lambda: store.delete(upload.path))
    return accepted


@router.get("/{dataset_id}", responses={404: {}})
def get_dataset(dataset_id: str, _: ReaderDep, session: SessionDep) -> DatasetOut:
    return service.to_out(session, service.get(session, dataset_id))
