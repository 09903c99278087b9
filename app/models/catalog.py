"""Sources, subjects, datasets, records: what data we hold and whose it is."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class Source(Base):
    """A data provider (a school district, an HR system); can be withdrawn whole."""

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="active")  # active|withdrawn
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Subject(Base):
    """A person, known only by a keyed HMAC of their external subject id."""

    __tablename__ = "subjects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_key: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    erased_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    """A collection of records with a schema; bytes live as Parquet partitions."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    schema: Mapped[dict[str, Any]] = mapped_column()  # columns, kinds, label classes
    n_partitions: Mapped[int] = mapped_column(Integer)
    artifact_prefix: Mapped[str] = mapped_column(String(300))
    # ready: usable; ingesting: a worker job is parsing the upload; failed: the upload
    # was refused (`error` says why) and holds no records.
    status: Mapped[str] = mapped_column(String(16), default="ready")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Record(Base):
    """One training row. `partition`/`row_key` locate its bytes in the Parquet store."""

    __tablename__ = "records"
    __table_args__ = (
        UniqueConstraint("dataset_id", "external_id"),
        Index("ix_records_subject_status", "subject_id", "status"),
        Index("ix_records_source_status", "source_id", "status"),
        # A job's records of a dataset that are not active (quarantined, staged).
        Index("ix_records_dataset_status", "dataset_id", "status"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id"))
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    partition: Mapped[int] = mapped_column(Integer)
    # active: usable; quarantined: awaiting erasure, never used by new training; staged:
    # written by an ingest job that has not finished (no request or job sees it).
    status: Mapped[str] = mapped_column(String(20), default="active")
    quarantined_by: Mapped[str | None] = mapped_column(String(32), default=None)
