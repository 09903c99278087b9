"""Webhook API shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.webhooks.targets import TargetRefused, check_syntax

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
    url: str = Field(
        min_length=1,
        max_length=2000,
        pattern=r"^https?://[^\x00-\x20\x7f]+$",
        description="http or https; no credentials, fragment or control characters; the "
        "host must not resolve to loopback, private, link-local, multicast, reserved or "
        "unspecified addresses (unless inside PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS)",
    )
    events: list[EventType] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        # No stripping: a URL with CR/LF or other control characters is refused whole.
        try:
            check_syntax(v)
        except TargetRefused as exc:
            raise ValueError(str(exc)) from exc
        return v

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
