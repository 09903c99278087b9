from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class ReportOut(BaseModel):
    id: str
    model: str
    candidate_version: int
    baseline_version: int | None
    passed: bool
    decision: str
    checks: dict[str, Any]
    created_at: datetime
    job_id: str | None = None
