"""Deletion requests and their per-model progress."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class DeletionRequest(Base):
    """What a portal or admin asked. Holds no raw personal data: only the subject key."""

    __tablename__ = "deletion_requests"
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))  # subject|records|source|feature
    status: Mapped[str] = mapped_column(String(20), default="received")
    subject_key: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    record_ids: Mapped[list[Any] | None] = mapped_column(default=None)
    source: Mapped[str | None] = mapped_column(String(200), default=None)
    feature: Mapped[str | None] = mapped_column(String(200), default=None)
    # A feature request on a text column may name words to forget (not the column).
    tokens: Mapped[list[Any] | None] = mapped_column(default=None)
    model_name: Mapped[str | None] = mapped_column(String(200), default=None)
    dataset_id: Mapped[str | None] = mapped_column(String(32), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    external_ref: Mapped[str | None] = mapped_column(String(200), default=None)
    api_key_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    due_at: Mapped[datetime] = mapped_column()
    extended_at: Mapped[datetime | None] = mapped_column(default=None)
    extension_reason: Mapped[str | None] = mapped_column(Text, default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    n_records: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class RequestModel(Base):
    """One model a request reaches, and how far forgetting has got on it."""

    __tablename__ = "request_models"
    __table_args__ = (UniqueConstraint("request_id", "model_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    # planned | unlearning | verifying | needs_review | promoted | failed
    status: Mapped[str] = mapped_column(String(20), default="planned")
    job_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    from_version: Mapped[int | None] = mapped_column(Integer, default=None)
    to_version: Mapped[int | None] = mapped_column(Integer, default=None)
    method: Mapped[str | None] = mapped_column(String(40), default=None)
    report_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
