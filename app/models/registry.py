"""Models, their immutable versions, and lineage (record -> model -> shard -> slice)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class MLModel(Base):
    """A named learning task on a dataset; `config` is the validated creation body."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    config: Mapped[dict[str, Any]] = mapped_column()
    # training | ready | failed
    status: Mapped[str] = mapped_column(String(20), default="training")
    production_version: Mapped[int | None] = mapped_column(Integer, default=None)
    # Jobs on one model are serialised: the job holding the lock, if any.
    locked_by_job: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """An immutable trained state. Status: candidate | production | retired | rejected |
    purged (artifacts erased because it was trained on erased data; never restorable)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by_job: Mapped[str | None] = mapped_column(String(32), default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Engine manifest (per shard: checkpoint keys, preprocessor) minus record-id lists,
    # which live in the artifact at `manifest_path`.
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest_path: Mapped[str] = mapped_column(String(300), default="")
    schema: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Its weights derive from records that have since been erased (an approximate
    # unlearning result that still serves): purged as soon as it stops serving.
    erased_data: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Lineage(Base):
    """Where a record went: which model, shard and slice, and the versions it reaches
    (`from_version`..`to_version`, open-ended while it is still trained on)."""

    __tablename__ = "lineage"
    __table_args__ = (
        UniqueConstraint("record_id", "model_id"),
        Index("ix_lineage_model_shard", "model_id", "shard"),
        # A job's open rows of a model and the ones closed since (app.pipeline.inputs).
        Index("ix_lineage_model_to_version", "model_id", "to_version"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    shard: Mapped[int] = mapped_column(Integer)
    slice: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(8))  # train | test
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer, default=None)
