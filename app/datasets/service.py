"""Ingest datasets and read their records back for training and erasure."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core import outbox
from app.core.chunks import in_chunks
from app.core.db import refresh_statistics
from app.core.errors import Conflict, NotFound
from app.core.security import subject_key
from app.core.settings import Settings
from app.core.storage import ArtifactStore
from app.datasets import archive
from app.datasets.parsing import media_schema, validate
from app.datasets.schemas import DatasetAccepted, DatasetOut, DatasetSpec
from app.datasets.warm import WARM
from app.jobs import routing
from app.ml.data import TabularData
from app.ml.device import derive_seed
from app.models import Dataset, Job, Record, Source, Subject

# Parquet columns that are ours, not the uploader's.
RID = "__record_id"
SKEY = "__subject_key"
SRC = "__source"


def partition_of(skey: str, n_partitions: int) -> int:
    """A subject's records share one storage partition, so erasing them rewrites one file."""
    return derive_seed("partition", skey) % n_partitions


def part_path(ds: Dataset, partition: int) -> str:
    return f"{ds.artifact_prefix}/part-{partition:04d}.parquet"


def get_or_create_ids(
    session: Session, model: type[Any], column: Any, values: Iterable[str]
) -> dict[str, int]:
    wanted = sorted(set(values))
    found: dict[str, int] = {}
    for part in in_chunks(wanted):
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


def check_name(session: Session, name: str) -> None:
    """409 when a dataset holds the name; a failed upload's dataset gives it up (a new
    upload under its name replaces it)."""
    existing = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if existing is None:
        return
    if existing.status != "failed":
        raise Conflict(f"a dataset named {name!r} already exists", code="dataset_exists")
    session.delete(existing)
    session.flush()


def stage(
    session: Session,
    spec: DatasetSpec,
    upload_path: str,
    filename: str,
    size: int,
    actor: str,
) -> DatasetAccepted:
    """A dataset `ingesting` an upload staged in the store, and the worker job that will
    parse it (sent after commit). Its schema is known once the job has read the file."""
    check_name(session, spec.name)
    ds = Dataset(
        name=spec.name,
        spec=spec.model_dump(),
        schema={},
        n_partitions=spec.partitions,
        artifact_prefix="",
        status="ingesting",
    )
    session.add(ds)
    session.flush()
    ds.artifact_prefix = f"datasets/{ds.id}"
    job = routing.create(
        session,
        kind="ingest",
        dataset_id=ds.id,
        method=None,
        result={"upload": upload_path, "filename": filename, "bytes": size},
    )
    audit.record(
        session,
        actor=actor,
        action="dataset.upload_staged",
        entity_type="dataset",
        entity_id=ds.id,
        data={"name": ds.name, "bytes": size, "job_id": job.id},
    )
    return DatasetAccepted(id=ds.id, name=ds.name, status=ds.status, job_id=job.id)


def ingest_job_id(session: Session, ds: Dataset) -> str | None:
    return session.scalars(
        select(Job.id).where(Job.dataset_id == ds.id, Job.kind == "ingest").limit(1)
    ).first()


def require_ready(ds: Dataset) -> None:
    """Models train on ready datasets only."""
    if ds.status != "ready":
        why = f": {ds.error}" if ds.status == "failed" and ds.error else ""
        raise Conflict(
            f"dataset {ds.name!r} is not ready (status {ds.status}){why}",
            code="dataset_not_ready",
        )


# What lineage queries plan over: their statistics are refreshed after an ingest.
LINEAGE_TABLES = ("records", "subjects", "sources")


def ingest(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    spec: DatasetSpec,
    table: pa.Table,
    actor: str,
) -> DatasetOut:
    """Validate, then write rows and Parquet partitions; on any failure nothing remains."""
    check_name(session, spec.name)
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
            **media_schema(parsed.feature_columns, parsed.numeric_columns, parsed.media_columns),
        },
        n_partitions=spec.partitions,
        artifact_prefix="",
    )
    session.add(ds)
    session.flush()
    ds.artifact_prefix = f"datasets/{ds.id}"
    subject_ids = get_or_create_ids(session, Subject, Subject.subject_key, keys)
    source_ids = get_or_create_ids(session, Source, Source.name, parsed.sources)
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
        # Image and audio files go to the content-addressed media store of their
        # record's partition; the Parquet column keeps the reference.
        for col, kind in parsed.media_columns.items():
            if kind == "text":
                continue
            refs = archive.store_media(
                store, ds.artifact_prefix, data.column(col).to_pylist(), partitions
            )
            data = data.set_column(data.column_names.index(col), col, pa.array(refs, pa.string()))
        for p in sorted(set(partitions)):
            store.write_table(part_path(ds, p), data.filter(pa.array(part_arr == p)))
    except BaseException:
        store.delete(ds.artifact_prefix)
        raise
    # If the surrounding transaction rolls back after this point, drop the bytes too.
    outbox.on_rollback(session, lambda: store.delete(ds.artifact_prefix))
    refresh_statistics(session, *LINEAGE_TABLES)
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
    if ds.status != "ready":
        return DatasetOut(
            id=ds.id,
            name=ds.name,
            status=ds.status,
            job_id=ingest_job_id(session, ds),
            error=ds.error,
            n_records=0,
            n_subjects=0,
            sources=[],
            feature_columns=[],
            group_columns=[],
            created_at=ds.created_at.isoformat(),
        )
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
        column_kinds=schema.get("column_kinds")
        or {
            f: "numeric" if f in schema["numeric_columns"] else "categorical"
            for f in schema["feature_columns"]
        },
        label_column=schema["label_column"],
        label_classes=schema["label_classes"],
        created_at=ds.created_at.isoformat(),
        job_id=ingest_job_id(session, ds),
    )


def read_partitions(store: ArtifactStore, ds: Dataset) -> pa.Table:
    tables = [store.read_table(p) for p in store.list(ds.artifact_prefix) if p.endswith(".parquet")]
    if not tables:
        raise NotFound(f"dataset {ds.id} has no stored records", code="dataset_empty")
    return pa.concat_tables(tables, promote_options="default")


def warm_rows(
    store: ArtifactStore,
    ds: Dataset,
    record_ids: np.ndarray,
    settings: Settings,
    on_read: Callable[[pa.Table], None],
) -> tuple[TabularData, bool] | None:
    """`record_ids`' rows from this worker's warm copy of the dataset (`app.datasets.warm`),
    reading and converting the whole dataset once if no copy is held (`on_read` is given
    the table read, so that a caller whose dataset is too large to keep still reads it
    only once), and whether the copy was already warm. None: no copy is kept (turned
    off, an image or audio dataset, or one above `warm_data_max_rows`)."""
    if settings.warm_data_seconds <= 0:
        return None
    if set(ds.schema.get("media_columns", {}).values()) & {"image", "audio"}:
        # Not for image or audio datasets: a copy would hold every file's bytes (each job
        # reads only the files of the rows it uses).
        return None

    def load() -> TabularData | None:
        table = read_partitions(store, ds)
        on_read(table)
        if table.num_rows > settings.warm_data_max_rows:
            return None
        return to_tabular(ds, table, None, store)

    return WARM.rows(ds.id, record_ids, load, ttl=settings.warm_data_seconds)


def read_rows(store: ArtifactStore, ds: Dataset, record_ids: np.ndarray) -> pa.Table:
    """Only the rows of `record_ids` (a fanned-out shard's), filtered partition by
    partition so that no more than one partition is held whole at a time."""
    wanted = pa.array(np.asarray(record_ids, dtype=np.int64), pa.int64())
    tables = []
    for p in store.list(ds.artifact_prefix):
        if p.endswith(".parquet"):
            t = store.read_table(p)
            tables.append(t.filter(pc.is_in(t.column(RID), wanted)))
    if not tables:
        raise NotFound(f"dataset {ds.id} has no stored records", code="dataset_empty")
    return pa.concat_tables(tables, promote_options="default")


def _objects(col: pa.ChunkedArray) -> np.ndarray:
    """A column as an object array of Python values (strings stay strings), converted
    by Arrow in one call rather than cell by cell."""
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def to_tabular(
    ds: Dataset,
    table: pa.Table,
    record_ids: np.ndarray | None = None,
    store: ArtifactStore | None = None,
) -> TabularData:
    """Arrow rows -> engine data, optionally restricted to `record_ids` (sorted by id).
    Text columns are strings; image and audio columns the files' bytes, read from the
    media store (`store`, the configured one by default)."""
    if record_ids is not None:
        table = table.filter(pc.is_in(table.column(RID), pa.array(record_ids, pa.int64())))
    # Sorted by id in Arrow, before anything is converted.
    table = table.sort_by(RID)
    schema = ds.schema
    columns: dict[str, np.ndarray] = {}
    for name in schema["numeric_columns"]:
        columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    for name in schema["categorical_columns"]:
        columns[name] = _objects(table.column(name))
    for name, kind in schema.get("media_columns", {}).items():
        if kind == "text":
            columns[name] = _objects(table.column(name))
        else:
            from app.core.storage import get_store

            refs = table.column(name).to_pylist()
            blobs = archive.load_media(store or get_store(), ds.artifact_prefix, refs)
            cells = np.empty(len(blobs), dtype=object)
            cells[:] = blobs
            columns[name] = cells
    for name in schema["group_columns"]:
        if name not in columns:
            col = table.column(name)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                columns[name] = _objects(pc.fill_null(col, "None"))  # as str(None) reads
            else:  # str() of each value, as it always was (Arrow prints floats its own way)
                columns[name] = np.asarray([str(v) for v in col.to_pylist()], dtype=object)
    # Label values -> class index, matched in Arrow (the classes are the schema's).
    label = table.column(schema["label_column"])
    if not pa.types.is_string(label.type):
        label = pc.cast(label, pa.string())
    classes = pa.array(schema["label_classes"], type=label.type)
    codes = pc.index_in(label, value_set=classes)
    if codes.null_count:
        raise ValueError("a label value is not one of the dataset's classes")
    data = TabularData(
        record_ids=table.column(RID).to_numpy().astype(np.int64),
        columns=columns,
        labels=codes.to_numpy(zero_copy_only=False).astype(np.int64),
        subjects=_objects(table.column(SKEY)),
        sources=_objects(table.column(SRC)),
    )
    return data


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
        # This worker's warm copy loses the rows before the partition does.
        WARM.drop_rows(ds.id, record_ids)
        kept = table.filter(pc.invert(mask))
        if kept.num_rows == 0:
            store.delete(path)
        else:
            store.write_table(path, kept)
        # The erased records' files, unless a remaining record holds the same content.
        media = [c for c, k in ds.schema.get("media_columns", {}).items() if k != "text"]
        gone: set[str] = set()
        for col in media:
            gone.update(r for r in table.filter(mask).column(col).to_pylist() if r)
        for col in media:
            gone.difference_update(kept.column(col).to_pylist())
        archive.delete_media(store, ds.artifact_prefix, gone)
    return removed
