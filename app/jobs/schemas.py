from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    # An ingest job works on a dataset (its model is "").
    dataset_id: str | None = None
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


class BatchingIn(BaseModel):
    """When planned requests on this model start their unlearning job.

    Requests coalesce into one pending job. The job starts `window_seconds` after its
    first request once it holds `min_batch` requests, or `max_wait_seconds` after it in
    any case; a request due within `deadline_margin_hours` starts it at once. Several
    requests in one job blur which record changed the model, and each job retrains the
    shards of all of them once.

    Rules across fields (a 422 otherwise): `max_batch`, when set, is at least
    `min_batch`, and `max_wait_seconds` is at least `window_seconds`."""

    model_config = ConfigDict(extra="forbid")
    window_seconds: float = Field(default=0.0, ge=0, le=30 * 86400)
    min_batch: int = Field(default=1, ge=1, le=100_000)
    # Upper bound on the requests one job takes (None: no bound); 1 = one job each.
    max_batch: int | None = Field(default=None, ge=1, le=100_000)
    max_wait_seconds: float = Field(default=86400.0, ge=0, le=30 * 86400)
    deadline_margin_hours: float = Field(default=72.0, ge=0, le=60 * 24)

    @model_validator(mode="after")
    def _order(self) -> BatchingIn:
        if self.max_wait_seconds < self.window_seconds:
            raise ValueError("max_wait_seconds must be at least window_seconds")
        if self.max_batch is not None and self.max_batch < self.min_batch:
            raise ValueError("max_batch must be at least min_batch")
        return self
