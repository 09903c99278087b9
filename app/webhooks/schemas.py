"""Webhook API shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

EventType = Literal[
    "request.received",
    "request.status_changed",
    "request.completed",
    "request.needs_review",
    "request.overdue",
    "job.failed",
    "model.promoted",
]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2000)
    events: list[EventType] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https"):
            raise ValueError("url must be http or https")
        if not parts.hostname:
            raise ValueError("url must name a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not carry credentials")
        if parts.fragment:
            raise ValueError("url must not have a fragment")
        try:
            _ = parts.port  # raises on a malformed port
        except ValueError as exc:
            raise ValueError("url has an invalid port") from exc
        return v.strip()

    @field_validator("events")
    @classmethod
    def _unique(cls, v: list[EventType]) -> list[EventType]:
        return sorted(set(v))


class WebhookCreated(BaseModel):
    id: str
    url: str
    events: list[str]
    secret: str


class WebhookSecret(BaseModel):
    id: str
    secret: str


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    created_at: datetime
    secret_rotated_at: datetime | None


class WebhookList(BaseModel):
    items: list[WebhookOut]


class AttemptOut(BaseModel):
    at: str
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    msg_id: str
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
    history: list[AttemptOut]


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
