"""A platform's callback for one deletion request: the outbox row of its completion."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class RequestCallback(Base):
    """Where and with what credential to report a request's end to the platform that
    sent it. The token is stored sealed (see `app.integrations.sealing`) and is never
    logged or returned.

    status: `waiting` (the request is open) | `pending` (due to be sent, or retrying) |
    `delivered` | `failed` (retries exhausted or refused for good) | `withheld` (the
    request ended without completing: the platform's protocol only reports completion).
    """

    __tablename__ = "request_callbacks"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("deletion_requests.id", ondelete="CASCADE"), unique=True
    )
    kind: Mapped[str] = mapped_column(String(20))  # fides
    url: Mapped[str] = mapped_column(String(2000))
    token_sealed: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    # What was (or will be) reported: the number of records erased.
    rows_masked: Mapped[int | None] = mapped_column(Integer, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Consecutive failures since the callback was (re)queued: drives the backoff.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
