"""Where a subject's data is held, and which model versions it still reaches."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import subject_key
from app.core.settings import Settings
from app.models import Dataset, DeletionRequest, Lineage, MLModel, ModelVersion, Record, Subject


def subject_lineage(session: Session, subject_id: str, settings: Settings) -> dict[str, Any]:
    key = subject_key(subject_id, settings.pepper)
    rows = session.execute(
        select(Record.id, Record.dataset_id)
        .join(Subject, Subject.id == Record.subject_id)
        .where(Subject.subject_key == key)
    ).all()
    record_ids = [r[0] for r in rows]
    ds_ids = sorted({r[1] for r in rows})
    names: dict[str, str] = {
        str(i): str(n)
        for i, n in session.execute(select(Dataset.id, Dataset.name).where(Dataset.id.in_(ds_ids)))
    }
    models: dict[str, dict[str, Any]] = {}
    for chunk in range(0, len(record_ids), 900):
        for model_name, model_id, shard, lo, hi, split in session.execute(
            select(
                MLModel.name,
                MLModel.id,
                Lineage.shard,
                Lineage.from_version,
                Lineage.to_version,
                Lineage.split,
            )
            .join(MLModel, MLModel.id == Lineage.model_id)
            .where(Lineage.record_id.in_(record_ids[chunk : chunk + 900]))
        ):
            entry = models.setdefault(
                model_name,
                {"model": model_name, "id": model_id, "versions": set(), "shards": set()},
            )
            if split != "train":
                continue
            entry["shards"].add(shard)
            live = {
                v
                for v, st in session.execute(
                    select(ModelVersion.version, ModelVersion.status).where(
                        ModelVersion.model_id == model_id
                    )
                )
                if st != "purged" and v >= lo and (hi is None or v <= hi)
            }
            entry["versions"] |= live
    requests = session.scalars(
        select(DeletionRequest.id)
        .where(DeletionRequest.subject_key == key)
        .order_by(DeletionRequest.received_at)
    ).all()
    return {
        "subject_id": subject_id,
        "records": len(record_ids),
        "datasets": [{"id": d, "name": names.get(d, "")} for d in ds_ids],
        "models": [
            {"model": m["model"], "versions": sorted(m["versions"]), "shards": sorted(m["shards"])}
            for m in models.values()
        ],
        "requests": list(requests),
    }
