"""Signed certificates, one per completed deletion request."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, utcnow


class Certificate(Base):
    """The whole signed document as issued (`{"certificate", "signature"}`); never
    rewritten, so what was handed out once verifies the same way later."""

    __tablename__ = "certificates"
    # No cascade: proof that a request was carried out outlives any cleanup of requests.
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), index=True)
    body: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
