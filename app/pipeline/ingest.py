"""An upload too large to ingest inside its request: the `ingest` job.

The staged file is read twice, in bounded batches: the first pass checks it whole (a
refusal is the job's error and the dataset's, with nothing written); the second writes
each batch's records (status `staged`, invisible to requests and jobs) in a short
transaction of its own and appends its rows to the partitions' Parquet files, under
temporary names. The last transaction moves nothing but flags: the records become
`active` and the dataset `ready`, together, once every partition is in place.

Crash safety as for every job (`start.begin`, the lease): a redelivery of a finished job
does nothing; a new attempt first removes what an earlier one left (staged records,
partition files), so an ingest is done once, whole, or not at all.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.chunks import in_chunks
from app.core.db import refresh_statistics, session_scope
from app.core.errors import AppError
from app.core.security import subject_key
from app.core.settings import get_settings
from app.core.storage import ArtifactStore, get_store
from app.datasets import service as datasets
from app.datasets import streaming
from app.datasets.parsing import media_schema
from app.datasets.schemas import DatasetSpec
from app.jobs import service as jobs
from app.models import Dataset, Job, Record, Source, Subject
from app.pipeline.start import WORKER, begin

log = logging.getLogger(__name__)
STAGED = "staged"


class PartitionFiles:
    """One Parquet file per partition, appended batch by batch under a temporary name
    of this attempt, moved into place when all are complete."""

    def __init__(self, store: ArtifactStore, ds: Dataset, attempt: int) -> None:
        self.store = store
        self.ds = ds
        self.attempt = attempt
        self._open: dict[int, tuple[Any, pq.ParquetWriter]] = {}

    def _tmp(self, p: int) -> str:
        return f"{datasets.part_path(self.ds, p)}.tmp-{self.attempt}"

    def write(self, p: int, table: pa.Table) -> None:
        if p not in self._open:
            fh = self.store.open(self._tmp(p), "wb")
            self._open[p] = (fh, pq.ParquetWriter(fh, table.schema, compression="zstd"))
        self._open[p][1].write_table(table)

    def finish(self) -> int:
        for fh, writer in self._open.values():
            writer.close()
            fh.close()
        for p in sorted(self._open):
            self.store.move(self._tmp(p), datasets.part_path(self.ds, p))
        return len(self._open)

    def abandon(self) -> None:
        for fh, writer in self._open.values():
            try:
                writer.close()
                fh.close()
            except Exception:
                log.warning("could not close a partition file", exc_info=True)


def run_ingest(job_id: str) -> None:
    started = time.perf_counter()
    with session_scope() as s:
        job = begin(s, job_id, "ingest")
        if job is None:
            _forget_upload(s, job_id)
            return
        token = job.attempts
        ds = s.get(Dataset, job.dataset_id)
        assert ds is not None
        upload = str(job.result["upload"])
        filename = str(job.result.get("filename", ""))
        size = int(job.result.get("bytes", 0))
        spec = DatasetSpec.model_validate(ds.spec)
        s.expunge(ds)
    store = get_store()
    _remove_partial(store, ds)
    report = jobs.ProgressReporter(job_id)
    try:
        with store.open(upload, "rb") as fh:
            found = streaming.scan(
                streaming.StagedFile(fh, filename, size), spec, report.sub(0, 0.3)
            )
    except AppError as exc:
        refuse(job_id, token, f"{exc.code}: {exc.message}", time.perf_counter() - started)
        return
    files = PartitionFiles(store, ds, token)
    try:
        n_records = _write(job_id, token, store, ds, spec, found, upload, filename, files, report)
        n_parts = files.finish()
    except BaseException:
        files.abandon()
        raise
    with session_scope() as s:
        job = jobs.claim(s, job_id, token)
        s.execute(
            update(Record)
            .where(Record.dataset_id == ds.id, Record.status == STAGED)
            .values(status="active")
        )
        live = s.get(Dataset, ds.id)
        assert live is not None
        live.status = "ready"
        live.error = None
        live.schema = {
            "feature_columns": found.columns.features,
            "categorical_columns": found.columns.categorical,
            "numeric_columns": found.columns.numeric,
            "group_columns": found.columns.groups,
            "label_column": spec.label_column,
            "label_classes": found.label_classes,
            **media_schema(found.columns.features, found.columns.numeric, found.columns.media),
        }
        refresh_statistics(s, *datasets.LINEAGE_TABLES)
        job.result = {**job.result, "records": n_records, "partitions": n_parts}
        wall = time.perf_counter() - started
        jobs.finish(s, job, ok=True, wall_seconds=wall, device="cpu", device_seconds=wall)
        audit.record(
            s,
            actor=WORKER,
            action="dataset.ingested",
            entity_type="dataset",
            entity_id=ds.id,
            data={"name": ds.name, "records": n_records, "partitions": n_parts, "job_id": job_id},
        )
    store.delete(upload)


def _write(
    job_id: str,
    token: int,
    store: ArtifactStore,
    ds: Dataset,
    spec: DatasetSpec,
    found: streaming.Scan,
    upload_path: str,
    filename: str,
    files: PartitionFiles,
    report: jobs.ProgressReporter,
) -> int:
    """The second pass: each batch's records in a transaction of its own, its rows
    appended to their partitions. The number of records written."""
    pepper = get_settings().pepper
    progress = report.sub(0.3, 0.98)
    offset = 0
    with store.open(upload_path, "rb") as fh:
        upload = streaming.StagedFile(fh, filename, store.size(upload_path))
        for batch in upload.batches():
            rows = streaming.prepare(batch, found, spec, offset)
            offset += batch.num_rows
            keys = [subject_key(x, pepper) for x in rows.subjects]
            partitions = [datasets.partition_of(k, ds.n_partitions) for k in keys]
            with session_scope() as s:
                jobs.claim(s, job_id, token)
                subject_ids = datasets.get_or_create_ids(s, Subject, Subject.subject_key, keys)
                source_ids = datasets.get_or_create_ids(s, Source, Source.name, rows.sources)
                record_ids: list[int] = []
                for lo in range(0, len(keys), 5000):
                    res = s.execute(
                        insert(Record).returning(Record.id, sort_by_parameter_order=True),
                        [
                            {
                                "dataset_id": ds.id,
                                "external_id": rows.external_ids[i],
                                "subject_id": subject_ids[keys[i]],
                                "source_id": source_ids[rows.sources[i]],
                                "partition": partitions[i],
                                "status": STAGED,
                            }
                            for i in range(lo, min(lo + 5000, len(keys)))
                        ],
                    )
                    record_ids.extend(r[0] for r in res)
            data = rows.table.append_column(datasets.RID, pa.array(record_ids, pa.int64()))
            data = data.append_column(datasets.SKEY, pa.array(keys, pa.string()))
            data = data.append_column(datasets.SRC, pa.array(rows.sources, pa.string()))
            part_arr = np.asarray(partitions)
            for p in sorted(set(partitions)):
                files.write(p, data.filter(pa.array(part_arr == p)))
            progress(upload.fraction())
    return offset


def _remove_partial(store: ArtifactStore, ds: Dataset) -> None:
    """What an earlier attempt of this job left: staged records, partition files."""
    while True:
        with session_scope() as s:
            ids = s.scalars(
                select(Record.id)
                .where(Record.dataset_id == ds.id, Record.status == STAGED)
                .limit(5000)
            ).all()
            if not ids:
                break
            s.execute(delete(Record).where(Record.id.in_(ids)))
    store.delete(ds.artifact_prefix)


def refuse(job_id: str, token: int | None, error: str, wall: float) -> None:
    """The upload is not a dataset (a 4xx had it been ingested inline): the job fails
    with the reason, so does the dataset, and neither records nor files remain."""
    with session_scope() as s:
        job = jobs.claim(s, job_id, token)
        jobs.finish(s, job, ok=False, error=error[:2000], wall_seconds=wall)
        fail_dataset(s, job, error)
        audit.record(
            s,
            actor=WORKER,
            action="job.failed",
            entity_type="job",
            entity_id=job_id,
            data={"kind": job.kind, "error": error[:500]},
        )


def fail_dataset(session: Session, job: Job, error: str) -> None:
    """An ingest job failed for good: its dataset is `failed` with the reason, its
    staged records, partitions and upload are gone (its name may be used again)."""
    ds = session.get(Dataset, job.dataset_id)
    if ds is None:
        return
    ds.status = "failed"
    ds.error = error[:2000]
    for chunk in in_chunks(
        list(
            session.scalars(
                select(Record.id).where(Record.dataset_id == ds.id, Record.status == STAGED)
            )
        )
    ):
        session.execute(delete(Record).where(Record.id.in_(chunk)))
    store = get_store()
    store.delete(ds.artifact_prefix)
    upload = (job.result or {}).get("upload")
    if upload:
        store.delete(upload)


def _forget_upload(session: Session, job_id: str) -> None:
    """A redelivered, finished ingest: its upload may outlive a crash right after the
    job's last commit; it is of no use now."""
    job = session.get(Job, job_id)
    if job is not None and job.kind == "ingest" and job.status in ("succeeded", "failed"):
        upload = (job.result or {}).get("upload")
        if upload:
            get_store().delete(upload)
