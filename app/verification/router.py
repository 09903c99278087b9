from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ReaderDep, SessionDep
from app.verification import service
from app.verification.schemas import ReportOut

router = APIRouter(prefix="/v1/reports", tags=["reports"])


@router.get("/{report_id}", responses={404: {}})
def get_report(report_id: str, _: ReaderDep, session: SessionDep) -> ReportOut:
    return service.to_out(session, service.get(session, report_id))
