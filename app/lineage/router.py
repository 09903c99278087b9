from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ReaderDep, SessionDep, SettingsDep
from app.lineage import service

router = APIRouter(prefix="/v1/subjects", tags=["lineage"])


@router.get("/{subject_id}/lineage")
def subject_lineage(
    subject_id: str, _: ReaderDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    return service.subject_lineage(session, subject_id, settings)
