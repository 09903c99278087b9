"""A model's mirror in an external model registry (MLflow): whether it is in sync.

One row per model, written in the transaction of the promotion or purge that made the
mirror stale (the outbox pattern); the sync itself is a reconciliation (the registry is
made to match Palimpsest's versions), so a lost task, a retry or a duplicate are
harmless. status: `pending` (due, or retrying after `failures`) | `synced` | `failing`
(retrying, the last attempt failed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, utcnow


class RegistryMirror(Base):
    __tablename__ = "registry_mirrors"
    model_id: Mapped[str] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    target: Mapped[str] = mapped_column(String(20), default="mlflow")
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    # Palimpsest version -> MLflow version, of what the last sync left there.
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    alias_version: Mapped[str | None] = mapped_column(String(40), default=None)
    synced_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
