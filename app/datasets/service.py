"""Ingest datasets and read their records back for training and erasure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.errors import Conflict, NotFound
from app.core.security import subject_key
from app.core.settings import Settings
from app.core.storage import ArtifactStore
from app.datasets.parsing import validate
from app.datasets.schemas import DatasetOut, DatasetSpec
from app.ml.data import TabularData
from app.ml.device import derive_seed
from app.models import Dataset, Record, Source, Subject

# Parquet columns that are ours, not the uploader's.
RID = "__record_id"
SKEY = "__subject_key"
SRC = "__source"


def partition_of(skey: str, n_partitions: int) -> int:
    """A subject's records share one storage partition, so erasing them rewrites one file."""
    return derive_seed("partition", skey) % n_partitions


def part_path(ds: Dataset, partition: int) -> str:
    return f"{ds.artifact_prefix}/part-{partition:04d}.parquet"


def _get_or_create_ids(
    session: Session, model: type[Any], column: Any, values: Iterable[str]
) -> dict[str, int]:
    wanted = sorted(set(values))
    found: dict[str, int] = {}
    for chunk in range(0, len(wanted), 900):
        part = wanted[chunk : chunk + 900]
        for row in session.execute(select(column, model.id).where(column.in_(part))):
            found[row[0]] = row[1]
    missing = [v for v in wanted if v not in found]
    if missing:
        rows = session.execute(
            insert(model).returning(column, model.id, sort_by_parameter_order=True),
            [{column.key: v} for v in missing],
        )
        for row in rows:
            found[row[0]] = row[1]
    return found


def ingest(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    spec: DatasetSpec,
    table: pa.Table,
    actor: str,
) -> DatasetOut:
    """Validate, then write rows and Parquet partitions; on any failure nothing remains."""
    if session.scalars(select(Dataset).where(Dataset.name == spec.name)).first() is not None:
        raise Conflict(f"a dataset named {spec.name!r} already exists", code="dataset_exists")
    parsed = validate(table, spec)
    keys = [subject_key(s, settings.pepper) for s in parsed.subjects]
    ds = Dataset(
        name=spec.name,
        spec=spec.model_dump(),
        schema={
            "feature_columns": parsed.feature_columns,
            "categorical_columns": parsed.categorical_columns,
            "numeric_columns": parsed.numeric_columns,
            "group_columns": parsed.group_columns,
            "label_column": spec.label_column,
            "label_classes": parsed.label_classes,
        },
        n_partitions=spec.partitions,
        artifact_prefix="",
    )
    session.add(ds)
    session.flush()
    ds.artifact_prefix = f"datasets/{ds.id}"
    subject_ids = _get_or_create_ids(session, Subject, Subject.subject_key, keys)
    source_ids = _get_or_create_ids(session, Source, Source.name, parsed.sources)
    partitions = [partition_of(k, spec.partitions) for k in keys]
    rows = [
        {
            "dataset_id": ds.id,
            "external_id": parsed.external_ids[i],
            "subject_id": subject_ids[keys[i]],
            "source_id": source_ids[parsed.sources[i]],
            "partition": partitions[i],
            "status": "active",
        }
        for i in range(len(keys))
    ]
    record_ids: list[int] = []
    for chunk in range(0, len(rows), 5000):
        res = session.execute(
            insert(Record).returning(Record.id, sort_by_parameter_order=True),
            rows[chunk : chunk + 5000],
        )
        record_ids.extend(r[0] for r in res)

    keep = parsed.feature_columns + [
        c for c in parsed.group_columns if c not in parsed.feature_columns
    ]
    keep += [spec.label_column]
    data = parsed.table.select(keep)
    data = data.append_column(RID, pa.array(record_ids, pa.int64()))
    data = data.append_column(SKEY, pa.array(keys, pa.string()))
    data = data.append_column(SRC, pa.array(parsed.sources, pa.string()))
    part_arr = np.asarray(partitions)
    try:
        for p in sorted(set(partitions)):
            store.write_table(part_path(ds, p), data.filter(pa.array(part_arr == p)))
    except BaseException:
        store.delete(ds.artifact_prefix)
        raise
    # If the surrounding transaction rolls back after this point, drop the bytes too.
    session.info.setdefault("on_rollback", []).append(lambda: store.delete(ds.artifact_prefix))
    audit.record(
        session,
        actor=actor,
        action="dataset.ingested",
        entity_type="dataset",
        entity_id=ds.id,
        data={"name": ds.name, "records": len(rows), "partitions": len(set(partitions))},
    )
    return to_out(session, ds)


def get(session: Session, dataset_id: str) -> Dataset:
    ds = session.get(Dataset, dataset_id)
    if ds is None:
        raise NotFound(f"no dataset {dataset_id!r}", code="dataset_not_found")
    return ds


def to_out(session: Session, ds: Dataset) -> DatasetOut:
    live = (Record.dataset_id == ds.id, Record.status != "erased")
    n_records = session.scalar(select(func.count()).select_from(Record).where(*live)) or 0
    n_subjects = (
        session.scalar(select(func.count(func.distinct(Record.subject_id))).where(*live)) or 0
    )
    sources = session.scalars(
        select(Source.name).join(Record, Record.source_id == Source.id).where(*live).distinct()
    ).all()
    schema = ds.schema
    return DatasetOut(
        id=ds.id,
        name=ds.name,
        n_records=n_records,
        n_subjects=n_subjects,
        sources=sorted(sources),
        feature_columns=schema["feature_columns"],
        group_columns=schema["group_columns"],
        categorical_columns=schema["categorical_columns"],
        label_column=schema["label_column"],
        label_classes=schema["label_classes"],
        created_at=ds.created_at.isoformat(),
    )


def read_partitions(store: ArtifactStore, ds: Dataset) -> pa.Table:
    tables = [store.read_table(p) for p in store.list(ds.artifact_prefix) if p.endswith(".parquet")]
    if not tables:
        raise NotFound(f"dataset {ds.id} has no stored records", code="dataset_empty")
    return pa.concat_tables(tables, promote_options="default")


def to_tabular(ds: Dataset, table: pa.Table, record_ids: np.ndarray | None = None) -> TabularData:
    """Arrow rows -> engine data, optionally restricted to `record_ids` (sorted by id)."""
    if record_ids is not None:
        table = table.filter(pc.is_in(table.column(RID), pa.array(record_ids, pa.int64())))
    schema = ds.schema
    columns: dict[str, np.ndarray] = {}
    for name in schema["numeric_columns"]:
        columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    for name in schema["categorical_columns"]:
        columns[name] = np.asarray(table.column(name).to_pylist(), dtype=object)
    for name in schema["group_columns"]:
        if name not in columns:
            columns[name] = np.asarray(
                [str(v) for v in table.column(name).to_pylist()], dtype=object
            )
    classes = {c: i for i, c in enumerate(schema["label_classes"])}
    labels = np.asarray(
        [classes[v] for v in table.column(schema["label_column"]).to_pylist()], dtype=np.int64
    )
    data = TabularData(
        record_ids=table.column(RID).to_numpy().astype(np.int64),
        columns=columns,
        labels=labels,
        subjects=np.asarray(table.column(SKEY).to_pylist(), dtype=object),
        sources=np.asarray(table.column(SRC).to_pylist(), dtype=object),
    )
    return data.sorted_by_id()


def erase_from_partitions(
    store: ArtifactStore, ds: Dataset, record_ids: list[int], partitions: set[int]
) -> int:
    """Rewrite the partitions holding `record_ids` without them. Idempotent."""
    removed = 0
    ids = pa.array(record_ids, pa.int64())
    for p in sorted(partitions):
        path = part_path(ds, p)
        if not store.exists(path):
            continue
        table = store.read_table(path)
        mask = pc.is_in(table.column(RID), ids)
        n = int(pc.sum(mask).as_py() or 0)
        if n == 0:
            continue
        removed += n
        kept = table.filter(pc.invert(mask))
        if kept.num_rows == 0:
            store.delete(path)
        else:
            store.write_table(path, kept)
    return removed
