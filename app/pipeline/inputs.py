"""A job's inputs, built once when it starts and passed through unlearning and
verification: the model's spec and production manifest, its lineage layout, and the
data (Parquet is read once per job, converted once, and every split is a view of it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.storage import ArtifactStore, get_store
from app.core.warm import Expiring
from app.datasets import service as datasets
from app.ml.data import TabularData
from app.ml.device import derive_seed, mix64
from app.ml.sisa import SisaManifest, ids_digest
from app.models import (
    Dataset,
    DeletionRequest,
    Job,
    Lineage,
    MLModel,
    ModelVersion,
    Record,
    RequestModel,
)
from app.pipeline.outcome import RequestEvents
from app.pipeline.spec import ModelSpec
from app.registry import artifacts
from app.registry import service as registry
from app.verification.forgetting import SAMPLE_SCORES

# Retained rows whose membership scores the dashboard draws (as many as the forgetting
# report keeps, so that the check scores these very rows).
MEMBER_SAMPLE = SAMPLE_SCORES


@dataclass
class Phases:
    """Seconds per phase of a job (loading, computation, each check, concluding), and
    how often the dataset's Parquet was read."""

    seconds: dict[str, float] = field(default_factory=dict)
    parquet_reads: int = 0
    # 1 when the job's rows came from the worker's warm copy, kept from an earlier job
    # (app.datasets.warm), instead of a read: every job reads its dataset once, here or
    # there.
    warm_reads: int = 0

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": dict(self.seconds),
            "parquet_reads": self.parquet_reads,
            "warm_reads": self.warm_reads,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Phases:
        d = d or {}
        return cls(
            dict(d.get("seconds", {})), int(d.get("parquet_reads", 0)), int(d.get("warm_reads", 0))
        )


@dataclass
class JobInputs:
    """A job's snapshot of its model: current lineage (record, shard, slice, split,
    active) sorted by record id, the production manifest, and its requests."""

    job_id: str
    model_id: str
    spec: ModelSpec
    config: dict[str, Any]
    ds: Dataset
    base_version: int
    new_version: int
    manifest_rel: str
    request_ids: list[str]
    features: list[tuple[str, str]]  # (feature, request id) of feature requests
    ids: np.ndarray
    shard: np.ndarray
    slc: np.ndarray
    is_train: np.ndarray
    is_active: np.ndarray
    retrain_estimate: float | None
    attempt: int | None = None  # the execution's fencing token (Job.attempts)
    started: float = field(default_factory=time.time)  # wall clock at the job's start
    phases: Phases = field(default_factory=Phases)
    _manifest: SisaManifest | None = field(default=None, repr=False)
    _data: TabularData | None = field(default=None, repr=False)
    _stored: pa.Table | None = field(default=None, repr=False)
    _retained: TabularData | None = field(default=None, repr=False)

    # -- layout -----------------------------------------------------------------------

    @property
    def retained_mask(self) -> np.ndarray:
        return np.asarray(self.is_train & self.is_active, dtype=bool)

    @property
    def forgotten(self) -> np.ndarray:
        return np.asarray(self.ids[self.is_train & ~self.is_active], dtype=np.int64)

    @property
    def test_ids(self) -> np.ndarray:
        return np.asarray(self.ids[~self.is_train & self.is_active], dtype=np.int64)

    @property
    def store(self) -> ArtifactStore:
        return get_store()

    @property
    def manifest(self) -> SisaManifest:
        """The production version's manifest, read once."""
        if self._manifest is None:
            self._manifest = artifacts.load_manifest(self.store, self.manifest_rel)
        return self._manifest

    def affected_shards(self) -> list[int]:
        return sorted(self.manifest.shards_containing(int(i) for i in self.forgotten))

    # -- data -------------------------------------------------------------------------

    def _table(self) -> pa.Table:
        """The dataset's rows as stored, read once per job."""
        if self._stored is None:
            with self.phases.timed("load"):
                self._stored = datasets.read_partitions(self.store, self.ds)
                self.phases.parquet_reads += 1
        return self._stored

    def _align(self, data: TabularData, ids: np.ndarray) -> TabularData:
        if not np.array_equal(data.record_ids, ids):
            raise RuntimeError(f"job {self.job_id}: {len(ids)} lineage rows, {len(data)} stored")
        return data

    def rows(self, mask: np.ndarray) -> TabularData:
        """The lineage rows under `mask`: from the worker's warm copy of the dataset when
        it holds one, else converted from the stored table (only those rows: a one-shard
        job never converts the other shards' rows)."""
        ids = self.ids[np.asarray(mask, dtype=bool)]
        if self._data is not None:
            return self._data.take(np.flatnonzero(mask))
        if self._stored is None:
            with self.phases.timed("load"):
                warm = datasets.warm_rows(self.store, self.ds, ids, get_settings(), self._read)
            if warm is not None:
                data, was_warm = warm
                if was_warm and not self.phases.parquet_reads:
                    self.phases.warm_reads = 1
                return data
        table = self._table()
        with self.phases.timed("load"):
            return self._align(datasets.to_tabular(self.ds, table, ids, self.store), ids)

    def _read(self, table: pa.Table) -> None:
        self._stored = table
        self.phases.parquet_reads += 1

    def retained(self) -> TabularData:
        """Every retained training row (converted once per job)."""
        if self._retained is None:
            self._retained = self.rows(self.retained_mask)
        return self._retained

    def retained_in(self, shards: list[int]) -> tuple[TabularData, np.ndarray]:
        """The retained rows of `shards` only, and their mask over the layout."""
        mask = self.retained_mask & np.isin(self.shard, np.asarray(shards, dtype=np.int64))
        return self.rows(mask), mask

    def forget(self, record_ids: np.ndarray | None = None) -> TabularData:
        """Quarantined rows are still readable until erasure: approximate methods need
        their gradients and the attack needs them."""
        wanted = self.forgotten if record_ids is None else np.asarray(record_ids, np.int64)
        # The layout is sorted by record id: a sorted search, not a set difference that
        # sorts every id of the model for a handful of rows.
        found = np.zeros(len(wanted), dtype=bool)
        if len(self.ids):
            pos = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
            found = self.ids[pos] == wanted
        missing = np.unique(wanted[~found])
        if len(missing):
            # Rows the model saw whose lineage is already closed (an earlier approximate
            # version's): read those few from storage.
            self.phases.parquet_reads += 1
            table = datasets.read_rows(self.store, self.ds, missing)
            extra = datasets.to_tabular(self.ds, table, missing, self.store)
            present = self.rows(np.isin(self.ids, wanted))
            both = np.concatenate([present.record_ids, extra.record_ids])
            order = np.argsort(both, kind="stable")
            return _concat(present, extra).take(order)
        return self.rows(np.isin(self.ids, wanted))

    def test(self) -> TabularData:
        return self.rows(~self.is_train & self.is_active)

    def verify_seed(self, *tag: object) -> int:
        """A seed for the job's verification from the model's key (its name-derived key
        for models trained since seeds stopped depending on install-random ids), its base
        version and the records forgotten: the same request on the same data and
        settings is verified alike on any install (never from the job's random id)."""
        return derive_seed(
            self.manifest.model_key,
            self.base_version,
            ids_digest(np.sort(np.asarray(self.forgotten, dtype=np.int64))),
            *tag,
        )

    def members(self) -> TabularData:
        """A fixed sample of the retained training rows (what "still a member" looks like
        beside the forgotten records' scores): the MEMBER_SAMPLE rows with the smallest
        hash of (record id, model key). The same rows job after job, until one of them
        is forgotten, so the production version's outputs on them can be kept like its
        test outputs (`app.pipeline.outputs`)."""
        pool = np.flatnonzero(self.retained_mask)
        if len(pool) > MEMBER_SAMPLE:
            h = mix64(self.ids[pool], derive_seed(self.manifest.model_key, "members"))
            pool = np.sort(pool[np.argpartition(h, MEMBER_SAMPLE - 1)[:MEMBER_SAMPLE]])
        pick = pool
        mask = np.zeros(len(self.ids), dtype=bool)
        mask[pick] = True
        return self.rows(mask)

    def shard_rows(self, shard: int) -> tuple[TabularData, np.ndarray]:
        """One shard's retained rows and their slices, reading only those rows (a fanned
        out shard task never converts the whole dataset)."""
        mask = self.retained_mask & (self.shard == shard)
        with self.phases.timed("load"):
            table: pa.Table = datasets.read_rows(self.store, self.ds, self.ids[mask])
            self.phases.parquet_reads += 1
            data = datasets.to_tabular(self.ds, table, self.ids[mask], self.store)
        if not np.array_equal(data.record_ids, self.ids[mask]):
            raise RuntimeError(f"job {self.job_id}: shard {shard} rows are missing")
        return data, self.slc[mask]

    # -- snapshot for fanned-out shards -------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model_id": self.model_id,
            "config": self.config,
            "dataset_id": self.ds.id,
            "base_version": self.base_version,
            "new_version": self.new_version,
            "manifest_rel": self.manifest_rel,
            "request_ids": self.request_ids,
            "features": [list(f) for f in self.features],
            "retrain_estimate": self.retrain_estimate,
            "attempt": self.attempt,
            "started": self.started,
            "phases": self.phases.to_dict(),
            "ids": self.ids.tolist(),
            "shard": self.shard.tolist(),
            "slc": self.slc.tolist(),
            "is_train": self.is_train.tolist(),
            "is_active": self.is_active.tolist(),
        }

    @classmethod
    def from_snapshot(cls, body: dict[str, Any]) -> JobInputs:
        with session_scope() as s:
            ds = datasets.get(s, body["dataset_id"])
            s.expunge(ds)
        return cls(
            job_id=body["job_id"],
            model_id=body["model_id"],
            spec=ModelSpec.of(body["model_id"], body["config"]),
            config=body["config"],
            ds=ds,
            base_version=body["base_version"],
            new_version=body["new_version"],
            manifest_rel=body["manifest_rel"],
            request_ids=body["request_ids"],
            features=[(f[0], f[1]) for f in body["features"]],
            ids=np.asarray(body["ids"], dtype=np.int64),
            shard=np.asarray(body["shard"], dtype=np.int64),
            slc=np.asarray(body["slc"], dtype=np.int64),
            is_train=np.asarray(body["is_train"], dtype=bool),
            is_active=np.asarray(body["is_active"], dtype=bool),
            retrain_estimate=body["retrain_estimate"],
            attempt=body.get("attempt"),
            started=float(body.get("started") or time.time()),
            phases=Phases.from_dict(body.get("phases")),
        )

    def dumps(self) -> bytes:
        return json.dumps(self.snapshot()).encode()


def _concat(a: TabularData, b: TabularData) -> TabularData:
    return TabularData(
        record_ids=np.concatenate([a.record_ids, b.record_ids]),
        columns={k: np.concatenate([a.columns[k], b.columns[k]]) for k in a.columns},
        labels=np.concatenate([a.labels, b.labels]),
        subjects=np.concatenate([a.subjects, b.subjects]),
        sources=np.concatenate([a.sources, b.sources]),
    )


@dataclass(frozen=True)
class _Layout:
    """A model's open lineage as arrays sorted by record id: record, shard, slice,
    is-train."""

    ids: np.ndarray
    shard: np.ndarray
    slc: np.ndarray
    is_train: np.ndarray

    def take(self, keep: np.ndarray) -> _Layout:
        return _Layout(self.ids[keep], self.shard[keep], self.slc[keep], self.is_train[keep])


# A worker's last-read lineage layout per model. A model's open lineage rows are written
# once, when its first version is trained, and never change after: they are only closed
# (`to_version` set) or deleted (erased). So a layout read earlier holds every row that
# is still open, with the right shard, slice and split, and the rows to take out of it
# are the ones closed or deleted since; the count of open rows proves that nothing
# else differs (else the layout is read again).
_LAYOUTS: Expiring[str, _Layout] = Expiring(capacity=8)


def _read_layout(session: Session, model_id: str) -> _Layout:
    """Tens of thousands of rows: read as the driver's plain tuples (no ORM rows; the
    columns need no type processing) straight into numpy, sorted there."""
    stmt = select(Lineage.record_id, Lineage.shard, Lineage.slice, Lineage.split == "train").where(
        Lineage.model_id == model_id, Lineage.to_version.is_(None)
    )
    rows = session.connection().execute(stmt).cursor.fetchall()
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    table = table[np.argsort(table[:, 0], kind="stable")]
    return _Layout(
        table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), table[:, 3].astype(bool)
    )


def _open_layout(session: Session, model_id: str) -> _Layout:
    """The model's open lineage: the worker's earlier layout less the rows closed since
    (when the count of open rows proves that is all that changed), or read afresh."""
    ttl = get_settings().warm_data_seconds
    cached = _LAYOUTS.get(model_id) if ttl > 0 else None
    if cached is not None:
        n_rows = session.scalar(
            select(func.count()).select_from(Lineage).where(Lineage.model_id == model_id)
        )
        closed = np.asarray(
            session.scalars(
                select(Lineage.record_id).where(
                    Lineage.model_id == model_id, Lineage.to_version.is_not(None)
                )
            ).all(),
            dtype=np.int64,
        )
        layout = cached.take(~np.isin(cached.ids, closed)) if len(closed) else cached
        if len(layout.ids) == int(n_rows or 0) - len(closed):
            return layout
    layout = _read_layout(session, model_id)
    _LAYOUTS.put(model_id, layout, ttl)
    return layout


def _lineage_rows(
    session: Session, model_id: str, dataset_id: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The model's open lineage sorted by record id, as arrays: record, shard, slice,
    is-train, is-active (its record is neither quarantined nor staged)."""
    layout = _open_layout(session, model_id)
    inactive = np.asarray(
        session.scalars(
            select(Record.id).where(Record.dataset_id == dataset_id, Record.status != "active")
        ).all(),
        dtype=np.int64,
    )
    return layout.ids, layout.shard, layout.slc, layout.is_train, ~np.isin(layout.ids, inactive)


def next_version(session: Session, model_id: str) -> int:
    top = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    )
    return int(top or 0) + 1


def build(session: Session, job: Job, stage: str, events: RequestEvents) -> JobInputs:
    """The job's inputs; its requests are told the job began `stage`."""
    t0 = time.perf_counter()
    model = session.get(MLModel, job.model_id)
    assert model is not None
    if model.production_version is None:
        raise RuntimeError(f"model {model.name} has no production version to start from")
    base = registry.get_version(session, model, model.production_version)
    request_ids = sorted(
        set(session.scalars(select(RequestModel.request_id).where(RequestModel.job_id == job.id)))
    )
    features = sorted(
        (req.feature, req.id)
        for req in session.scalars(
            select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))
        )
        if req.kind == "feature" and req.feature
    )
    events.started(session, job.id, stage, model.production_version)
    lineage = _lineage_rows(session, model.id, model.dataset_id)
    ds = datasets.get(session, model.dataset_id)
    session.expunge(ds)
    train_job = session.scalars(
        select(Job).where(Job.model_id == model.id, Job.kind == "train", Job.status == "succeeded")
    ).first()
    inputs = JobInputs(
        job_id=job.id,
        model_id=model.id,
        spec=ModelSpec.of(model.id, model.config),
        config=model.config,
        ds=ds,
        base_version=model.production_version,
        new_version=next_version(session, model.id),
        manifest_rel=base.manifest_path,
        request_ids=request_ids,
        features=features,
        ids=lineage[0],
        shard=lineage[1],
        slc=lineage[2],
        is_train=lineage[3],
        is_active=lineage[4],
        retrain_estimate=float(train_job.cost.get("wall_seconds", 0.0)) if train_job else None,
        attempt=job.attempts,
    )
    inputs.phases.add("load", time.perf_counter() - t0)
    return inputs
