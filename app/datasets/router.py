"""`/v1/datasets`: multipart ingest (admin)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import ValidationError

from app.api.deps import AdminDep, ReaderDep, SessionDep, SettingsDep
from app.core.errors import PayloadTooLarge, Unprocessable
from app.core.storage import get_store
from app.datasets import service
from app.datasets.parsing import read_table
from app.datasets.schemas import DatasetOut, DatasetSpec

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
MAX_UPLOAD = 512 * 1024 * 1024


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


@router.post("", status_code=201, responses={409: {}, 413: {}, 422: {}})
def create_dataset(
    caller: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="CSV or Parquet")],
    spec: Annotated[str, Form(description="JSON dataset spec")],
) -> DatasetOut:
    parsed_spec = parse_spec(spec)
    data = file.file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise PayloadTooLarge(f"files are limited to {MAX_UPLOAD // 2**20} MiB")
    table = read_table(data, file.filename or "")
    return service.ingest(session, get_store(settings), settings, parsed_spec, table, caller.actor)


@router.get("/{dataset_id}", responses={404: {}})
def get_dataset(dataset_id: str, _: ReaderDep, session: SessionDep) -> DatasetOut:
    return service.to_out(session, service.get(session, dataset_id))
