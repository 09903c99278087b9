"""View models for the operational pages: jobs, datasets, models, the audit log and
webhooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.errors import BadRequest, NotFound
from app.core.storage import ArtifactStore
from app.dashboard.rows import ACTIVE_JOB, JOB_STATUSES, JobRow, job_rows
from app.datasets.archive import media_prefix
from app.models import AuditEvent, Dataset, Job, MLModel, ModelVersion, Record, Source
from app.models.mirrors import RegistryMirror
from app.models.webhooks import WebhookDelivery, WebhookEndpoint
from app.webhooks import service as webhooks
from app.webhooks.schemas import DeliveryOut, WebhookOut

MAX_IDS = 100

# -- jobs -------------------------------------------------------------------------------


def job_list(session: Session, status: str | None = None, limit: int = 100) -> list[JobRow]:
    """Active jobs first (running, then pending), then the most recent others."""
    status = (status or "").strip() or None
    if status is not None and status not in JOB_STATUSES:
        raise BadRequest(f"unknown job status {status!r}", code="invalid_filter")
    active: list[Job] = []
    if status is None or status in ACTIVE_JOB:
        active = list(
            session.scalars(
                select(Job)
                .where(Job.status.in_([status] if status else ACTIVE_JOB))
                .order_by(Job.status.desc(), Job.created_at, Job.id)
                .limit(limit)
            )
        )
    rest: list[Job] = []
    if status is None or status not in ACTIVE_JOB:
        rest = list(
            session.scalars(
                select(Job)
                .where(Job.status.in_([status] if status else ("succeeded", "failed")))
                .order_by(Job.created_at.desc(), Job.id.desc())
                .limit(max(0, limit - len(active)))
            )
        )
    return job_rows(session, [*active, *rest])


def jobs_by_id(session: Session, ids: list[str]) -> list[JobRow]:
    """The jobs a page shows, for its progress bars to poll (unknown ids are skipped)."""
    ids = [i for i in dict.fromkeys(ids) if 0 < len(i) <= 64][:MAX_IDS]
    if not ids:
        return []
    return job_rows(session, list(session.scalars(select(Job).where(Job.id.in_(ids)))))


@dataclass
class Phase:
    name: str  # load, compute, verify.<check>, conclude, ...
    seconds: float
    share: float  # of the job's wall time, 0..1


@dataclass
class JobDetail:
    job: JobRow
    failures: list[AuditEvent]
    phases: list[Phase]
    parquet_reads: int | None
    warm_reads: int = 0  # rows taken from the worker's warm copy instead of a read


def job_phases(job: Job) -> tuple[list[Phase], int | None]:
    """Where the job's time went (`result.phases`), in the order work happens."""
    recorded = (job.result or {}).get("phases") or {}
    seconds: dict[str, float] = recorded.get("seconds") or {}
    wall = float((job.cost or {}).get("wall_seconds") or 0.0) or sum(seconds.values()) or 1.0
    order = ["load", "shard_load", "compute", "metrics", "verify.load"]

    def rank(name: str) -> tuple[int, str]:
        if name in order:
            return order.index(name), name
        return (len(order), name) if name.startswith("verify") else (len(order) + 1, name)

    phases = [
        Phase(name, float(v), min(1.0, float(v) / wall))
        for name, v in sorted(seconds.items(), key=lambda kv: rank(kv[0]))
    ]
    reads = recorded.get("parquet_reads")
    return phases, int(reads) if reads is not None else None


def job_detail(session: Session, job_id: str) -> JobDetail:
    job = session.get(Job, job_id) if len(job_id) <= 64 else None
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    failures = list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_type == "job", AuditEvent.entity_id == job.id)
            .order_by(AuditEvent.id)
        )
    )
    phases, reads = job_phases(job)
    warm = int(((job.result or {}).get("phases") or {}).get("warm_reads") or 0)
    return JobDetail(job_rows(session, [job])[0], failures, phases, reads, warm)


# -- models -----------------------------------------------------------------------------


@dataclass
class ModelRow:
    name: str
    status: str
    production_version: int | None
    versions: int
    mode: str
    architecture: str
    shards: int
    locked_by_job: str | None
    created_at: datetime


def _mode(config: dict[str, Any]) -> str:
    u = config.get("unlearning") or {}
    mode = str(u.get("mode", "sisa"))
    if u.get("certified"):
        return f"{mode} (certified)"
    return mode


def _arch(config: dict[str, Any]) -> str:
    a = config.get("architecture") or {}
    kind = str(a.get("kind", "?"))
    return f"{kind} {a.get('hidden')}" if kind == "mlp" else kind


def _model_row(m: MLModel, versions: int) -> ModelRow:
    return ModelRow(
        name=m.name,
        status=m.status,
        production_version=m.production_version,
        versions=versions,
        mode=_mode(m.config),
        architecture=_arch(m.config),
        shards=int((m.config.get("unlearning") or {}).get("shards", 1)),
        locked_by_job=m.locked_by_job,
        created_at=m.created_at,
    )


def model_list(session: Session) -> list[ModelRow]:
    counts = dict(
        session.execute(select(ModelVersion.model_id, func.count()).group_by(ModelVersion.model_id))
        .tuples()
        .all()
    )
    return [
        _model_row(m, int(counts.get(m.id, 0)))
        for m in session.scalars(select(MLModel).order_by(MLModel.name))
    ]


@dataclass
class VersionRow:
    version: int
    status: str
    created_at: datetime
    created_by_job: str | None
    job_kind: str | None
    method: str | None
    test_accuracy: float | None
    retrained_shards: list[int]
    production: bool
    n_shards: int = 0

    @property
    def retrained_label(self) -> str:
        """Which shards this version retrained, unambiguously: "none", "shard 0 (1 of 4)",
        "shards 0, 2 (2 of 4)", "all 4" (a bare "0" would read as "none")."""
        return retrained_label(self.retrained_shards, self.n_shards)


def retrained_label(shards: list[int], total: int, most: int = 6) -> str:
    if total == 0:
        return "\u2013"  # no shard manifest to compare
    if not shards:
        return "none"
    if total <= 1:
        return "the whole model"
    if len(shards) >= total:
        return f"all {total}"
    listed = ", ".join(str(s) for s in shards[:most]) + (", …" if len(shards) > most else "")
    word = "shard" if len(shards) == 1 else "shards"
    return f"{word} {listed} ({len(shards)} of {total})"


@dataclass
class ShardCell:
    shard: int
    n_records: int | None
    retrained: bool


@dataclass
class ShardMapRow:
    version: int
    status: str
    cells: list[ShardCell]

    @property
    def retrained(self) -> int:
        return sum(c.retrained for c in self.cells)

    def cell(self, shard: int) -> ShardCell | None:
        return next((c for c in self.cells if c.shard == shard), None)


@dataclass
class CertifiedBudget:
    epsilon: float | None
    delta: float | None
    budget: float | None
    budget_left: float | None
    removals: int | None
    version: int

    @property
    def share_left(self) -> float | None:
        if self.budget is None or self.budget_left is None or self.budget <= 0:
            return None
        return max(0.0, min(1.0, self.budget_left / self.budget))


@dataclass
class ModelDetail:
    model: ModelRow
    versions: list[VersionRow]
    shards: list[int]
    shard_map: list[ShardMapRow]
    certified: CertifiedBudget | None
    config: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputRow] = field(default_factory=list)

    # The MLflow mirror's state (issue 14), when PALIMPSEST_MLFLOW_TRACKING_URI is set.
    mirror: RegistryMirror | None = None
    # The dataset it was trained on (its dashboard page), when it still exists.
    dataset_id: str | None = None
    dataset_name: str | None = None


@dataclass
class InputRow:
    """One feature column of a model: its kind in the dataset, its encoder (text, image
    and audio columns) and what was forgotten of it."""

    column: str
    kind: str
    encoder: str
    params: str
    forgotten: str


def column_kinds(schema: dict[str, Any]) -> dict[str, str]:
    """Every feature column's kind (numeric, categorical, text, image, audio); datasets
    ingested before media columns existed have no `column_kinds` and are all tabular."""
    kinds: dict[str, str] = schema.get("column_kinds") or {
        c: "numeric" if c in schema.get("numeric_columns", []) else "categorical"
        for c in schema.get("feature_columns", [])
    }
    return kinds


def input_rows(session: Session, model: MLModel) -> list[InputRow]:
    ds = session.get(Dataset, model.dataset_id)
    kinds = column_kinds(ds.schema if ds is not None else {})
    resolved = model.config.get("resolved") or {}
    media = {e["column"]: e for e in (resolved.get("feature_spec") or {}).get("media", [])}
    removed = {d["feature"] for d in resolved.get("removed_features", [])}
    rows = []
    for c in model.config.get("feature_columns", []):
        e = media.get(c) or {}
        params = ", ".join(
            f"{k}={v}" for k, v in e.items() if k not in ("column", "kind", "blocked")
        )
        gone = "whole column" if c in removed else ", ".join(e.get("blocked", []))
        rows.append(InputRow(c, kinds.get(c, "?"), str(e.get("kind", "")), params, gone))
    return rows


def _entries(mv: ModelVersion) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for e in (mv.manifest or {}).get("entries") or []:
        if isinstance(e, dict) and isinstance(e.get("shard"), int):
            out[e["shard"]] = e
    return out


def shard_map(versions: list[ModelVersion]) -> tuple[list[int], list[ShardMapRow]]:
    """Per version and shard: the records it trained on, and whether that shard's final
    checkpoint differs from the previous version's (it was retrained). Checkpoints are
    content-addressed, so an unchanged key means the shard was reused as it was."""
    shards: set[int] = set()
    rows: list[ShardMapRow] = []
    previous: dict[int, dict[str, Any]] | None = None
    for mv in versions:
        entries = _entries(mv)
        shards |= set(entries)
        cells = [
            ShardCell(
                shard=s,
                n_records=int(e["n_records"]) if isinstance(e.get("n_records"), int) else None,
                retrained=previous is None
                or s not in previous
                or previous[s].get("final_key") != e.get("final_key"),
            )
            for s, e in sorted(entries.items())
        ]
        rows.append(ShardMapRow(mv.version, mv.status, cells))
        if entries:
            previous = entries
    return sorted(shards), rows


def _certified(mv: ModelVersion, job: Job | None) -> CertifiedBudget | None:
    """The removal budget as the version that serves left it: its unlearning result, or
    (for a first version) the training job's state summary."""
    state = (mv.metrics or {}).get("unlearning") or {}
    if not isinstance(state, dict) or "budget_left" not in state:
        result = (job.result or {}) if job is not None else {}
        state = result.get("certified") or (result.get("unlearning") or {})
    if not isinstance(state, dict) or "budget_left" not in state:
        return None

    def num(key: str) -> float | None:
        v = state.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    removals = state.get("removals")
    return CertifiedBudget(
        epsilon=num("epsilon"),
        delta=num("delta"),
        budget=num("budget"),
        budget_left=num("budget_left"),
        removals=int(removals) if isinstance(removals, int) else None,
        version=mv.version,
    )


def model_detail(session: Session, name: str) -> ModelDetail:
    model = (
        session.scalars(select(MLModel).where(MLModel.name == name)).first()
        if len(name) <= 200
        else None
    )
    if model is None:
        raise NotFound(f"no model named {name!r}", code="model_not_found")
    versions = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.version)
        )
    )
    job_ids = {v.created_by_job for v in versions if v.created_by_job}
    jobs = (
        {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        if job_ids
        else {}
    )
    shards, smap = shard_map(versions)
    retrained = {row.version: [c.shard for c in row.cells if c.retrained] for row in smap}
    rows = []
    for v in versions:
        job = jobs.get(v.created_by_job or "")
        acc = (v.metrics or {}).get("test_accuracy")
        rows.append(
            VersionRow(
                version=v.version,
                status=v.status,
                created_at=v.created_at,
                created_by_job=v.created_by_job,
                job_kind=job.kind if job else None,
                method=str(((v.metrics or {}).get("unlearning") or {}).get("method") or "")
                or (job.method if job else None),
                test_accuracy=float(acc) if isinstance(acc, int | float) else None,
                retrained_shards=retrained.get(v.version, []),
                production=v.version == model.production_version,
                n_shards=len(shards),
            )
        )
    ds = session.get(Dataset, model.dataset_id)
    certified = None
    if (model.config.get("unlearning") or {}).get("certified"):
        serving = next((v for v in versions if v.version == model.production_version), None)
        if serving is not None:
            certified = _certified(serving, jobs.get(serving.created_by_job or ""))
    return ModelDetail(
        model=_model_row(model, len(versions)),
        versions=list(reversed(rows)),
        shards=shards,
        shard_map=list(reversed(smap)),
        certified=certified,
        config={k: v for k, v in model.config.items() if k != "resolved"},
        inputs=input_rows(session, model),
        mirror=session.get(RegistryMirror, model.id),
        dataset_id=ds.id if ds is not None else None,
        dataset_name=ds.name if ds is not None else None,
    )


# -- datasets ---------------------------------------------------------------------------


@dataclass
class DatasetRow:
    id: str
    name: str
    status: str
    n_records: int  # live (not erased) records
    n_subjects: int
    kinds: dict[str, int]  # feature kind -> number of columns of that kind
    models: int
    created_at: datetime

    @property
    def kinds_label(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in self.kinds.items()) or "\u2013"


@dataclass
class ColumnRow:
    """One column the dataset's spec names, with its kind: a feature's kind (numeric,
    categorical, text, image, audio) or the column's role (subject, label, source, group,
    record id); `roles` lists every role it plays (a group column may be a feature)."""

    column: str
    kind: str
    roles: list[str]
    note: str = ""


@dataclass
class MediaUsage:
    """The image and audio files the dataset's media store holds now (after erasures)."""

    files: int
    bytes: int


@dataclass
class DatasetDetail:
    dataset: DatasetRow
    columns: list[ColumnRow]
    sources: list[str]
    label_classes: list[str]
    partitions: int
    error: str | None
    media: MediaUsage | None  # None: the dataset has no image or audio column
    models: list[ModelRow]


KIND_ORDER = ("numeric", "categorical", "text", "image", "audio")


def _kind_counts(schema: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in column_kinds(schema).values():
        counts[kind] = counts.get(kind, 0) + 1
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _live_counts(session: Session, dataset_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Per dataset: live (not erased) records and distinct subjects, in one query."""
    if not dataset_ids:
        return {}
    rows = session.execute(
        select(Record.dataset_id, func.count(), func.count(func.distinct(Record.subject_id)))
        .where(Record.dataset_id.in_(dataset_ids), Record.status != "erased")
        .group_by(Record.dataset_id)
    ).tuples()
    return {d: (int(n), int(s)) for d, n, s in rows}


def _dataset_row(ds: Dataset, counts: tuple[int, int], models: int) -> DatasetRow:
    return DatasetRow(
        id=ds.id,
        name=ds.name,
        status=ds.status,
        n_records=counts[0],
        n_subjects=counts[1],
        kinds=_kind_counts(ds.schema or {}),
        models=models,
        created_at=ds.created_at,
    )


def dataset_list(session: Session, limit: int = 500) -> list[DatasetRow]:
    """Datasets, newest first."""
    datasets = list(
        session.scalars(
            select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id).limit(limit)
        )
    )
    ids = [d.id for d in datasets]
    counts = _live_counts(session, ids)
    models = dict(
        session.execute(
            select(MLModel.dataset_id, func.count())
            .where(MLModel.dataset_id.in_(ids))
            .group_by(MLModel.dataset_id)
        )
        .tuples()
        .all()
    )
    return [_dataset_row(d, counts.get(d.id, (0, 0)), int(models.get(d.id, 0))) for d in datasets]


def dataset_columns(spec: dict[str, Any], schema: dict[str, Any]) -> list[ColumnRow]:
    """The spec's columns in the order a reader needs them: subject, label, source and
    record id, then the features, then group columns that are not features."""
    kinds = column_kinds(schema)
    groups = list(schema.get("group_columns") or spec.get("group_columns") or [])
    out: list[ColumnRow] = []
    classes = schema.get("label_classes") or []
    for role, key, note in (
        ("subject", "subject_column", "pseudonymised (keyed hash); never stored as sent"),
        ("label", "label_column", f"classes: {', '.join(map(str, classes))}" if classes else ""),
        ("source", "source_column", "a source request withdraws all its records"),
        ("record id", "record_id_column", "stable ids for records requests"),
    ):
        column = spec.get(key) or (schema.get(key) if key == "label_column" else None)
        if column:
            out.append(ColumnRow(str(column), role, [role], note))
    for c in schema.get("feature_columns") or []:
        roles = ["feature"] + (["group"] if c in groups else [])
        out.append(ColumnRow(c, kinds.get(c, "?"), roles))
    for g in groups:
        if g not in kinds:
            out.append(ColumnRow(g, "group", ["group"], "judged by the fairness check"))
    return out


def media_usage(store: ArtifactStore, ds: Dataset) -> MediaUsage | None:
    """Files and bytes under the dataset's media store; None when no column is image or
    audio (text lives in the Parquet partitions)."""
    if not set((ds.schema or {}).get("media_columns", {}).values()) & {"image", "audio"}:
        return None
    if not ds.artifact_prefix:
        return MediaUsage(0, 0)
    files, size = store.usage(media_prefix(ds.artifact_prefix))
    return MediaUsage(files, size)


def dataset_detail(session: Session, store: ArtifactStore, dataset_id: str) -> DatasetDetail:
    ds = session.get(Dataset, dataset_id) if len(dataset_id) <= 64 else None
    if ds is None:
        raise NotFound(f"no dataset {dataset_id!r}", code="dataset_not_found")
    models = list(
        session.scalars(select(MLModel).where(MLModel.dataset_id == ds.id).order_by(MLModel.name))
    )
    versions = dict(
        session.execute(
            select(ModelVersion.model_id, func.count())
            .where(ModelVersion.model_id.in_([m.id for m in models]))
            .group_by(ModelVersion.model_id)
        )
        .tuples()
        .all()
    )
    sources = sorted(
        session.scalars(
            select(Source.name)
            .join(Record, Record.source_id == Source.id)
            .where(Record.dataset_id == ds.id, Record.status != "erased")
            .distinct()
        )
    )
    schema = ds.schema or {}
    return DatasetDetail(
        dataset=_dataset_row(ds, _live_counts(session, [ds.id]).get(ds.id, (0, 0)), len(models)),
        columns=dataset_columns(ds.spec or {}, schema),
        sources=sources,
        label_classes=[str(c) for c in schema.get("label_classes") or []],
        partitions=ds.n_partitions,
        error=ds.error,
        media=media_usage(store, ds),
        models=[_model_row(m, int(versions.get(m.id, 0))) for m in models],
    )


# -- audit ------------------------------------------------------------------------------


@dataclass
class AuditPage:
    events: list[AuditEvent]
    next_cursor: int | None
    chain: audit.ChainCheck
    cursor: int | None
    action: str | None = None
    # Events per action over the whole log, most frequent first: the log at a glance.
    actions: list[tuple[str, int]] = field(default_factory=list)

    def query(self, cursor: int | None) -> dict[str, str]:
        out = {"action": self.action} if self.action else {}
        return out | ({"cursor": str(cursor)} if cursor is not None else {})


def parse_cursor(cursor: str | None) -> int | None:
    cursor = (cursor or "").strip()
    if not cursor:
        return None
    if not cursor.isdigit() or len(cursor) > 18:
        raise BadRequest("the cursor is an event id", code="invalid_cursor")
    return int(cursor)


def audit_page(
    session: Session, cursor: int | None, action: str | None = None, limit: int = 50
) -> AuditPage:
    """A page of events, newest first (optionally of one action), and the chain's status
    recomputed over the whole log."""
    action = (action or "").strip() or None
    if action is not None and len(action) > 60:
        raise BadRequest("unknown action", code="invalid_filter")
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
    if cursor is not None:
        q = q.where(AuditEvent.id < cursor)
    if action is not None:
        q = q.where(AuditEvent.action == action)
    rows = list(session.scalars(q))
    counts = session.execute(
        select(AuditEvent.action, func.count())
        .group_by(AuditEvent.action)
        .order_by(func.count().desc(), AuditEvent.action)
    ).tuples()
    return AuditPage(
        events=rows[:limit],
        next_cursor=rows[limit - 1].id if len(rows) > limit else None,
        chain=audit.verify_chain(session),
        cursor=cursor,
        action=action,
        actions=[(a, int(n)) for a, n in counts],
    )


# -- webhooks ---------------------------------------------------------------------------


@dataclass
class EndpointRow:
    endpoint: WebhookOut
    delivered: int
    failed: int
    pending: int


@dataclass
class WebhooksPage:
    endpoints: list[EndpointRow]
    deliveries: list[tuple[str, DeliveryOut]]  # (endpoint url, delivery)
    failed_only: bool


def webhooks_page(session: Session, failed_only: bool = False, limit: int = 50) -> WebhooksPage:
    counts: dict[tuple[str, str], int] = {}
    for ep_id, status, n in session.execute(
        select(WebhookDelivery.endpoint_id, WebhookDelivery.status, func.count()).group_by(
            WebhookDelivery.endpoint_id, WebhookDelivery.status
        )
    ).tuples():
        counts[(ep_id, status)] = int(n)
    endpoints = [
        EndpointRow(
            ep,
            counts.get((ep.id, "delivered"), 0),
            counts.get((ep.id, "failed"), 0),
            counts.get((ep.id, "pending"), 0),
        )
        for ep in webhooks.list_endpoints(session)
    ]
    urls = dict(session.execute(select(WebhookEndpoint.id, WebhookEndpoint.url)).tuples().all())
    q = select(WebhookDelivery)
    if failed_only:
        # Failed for good, or still retrying after a failed attempt.
        q = q.where(
            (WebhookDelivery.status == "failed")
            | ((WebhookDelivery.status == "pending") & (WebhookDelivery.failures > 0))
        )
    q = q.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)
    deliveries = [
        (urls.get(d.endpoint_id, d.endpoint_id), webhooks.delivery_out(d))
        for d in session.scalars(q)
    ]
    return WebhooksPage(endpoints, deliveries, failed_only)
