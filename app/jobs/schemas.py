from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class JobCost(BaseModel):
    wall_seconds: float | None = None
    device: str | None = None
    device_seconds: float | None = None
    retrain_estimate_seconds: float | None = None
    energy_joules: float | None = None  # where NVML reports it


class JobOut(BaseModel):
    id: str
    kind: str
    status: str
    progress: float
    model: str
    request_ids: list[str]
    method: str | None
    started_at: datetime | None
    finished_at: datetime | None
    cost: JobCost
    report_id: str | None
    result: dict[str, Any] = {}
    error: str | None = None
    # Held by the model's batching policy until this time (null once sent to workers).
    not_before: datetime | None = None
    # Executions so far (a retry or a takeover after a worker died starts another), and
    # the lease of the one running: its worker (host:pid) and last heartbeat.
    attempts: int = 0
    worker: str | None = None
    heartbeat_at: datetime | None = None
