from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ReaderDep, SessionDep
from app.jobs import service
from app.jobs.schemas import JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", responses={404: {}})
def get_job(job_id: str, _: ReaderDep, session: SessionDep) -> JobOut:
    return service.to_out(session, service.get(session, job_id))
