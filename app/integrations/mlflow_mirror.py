"""The MLflow registry mirror (API.md, Integrations): with PALIMPSEST_MLFLOW_TRACKING_URI
set, every promoted version is a version of the MLflow registered model of the same name,
tagged `palimpsest.version`, `palimpsest.method` and `palimpsest.requests`; the alias
`production` points at the mirror of Palimpsest's production version; a purged version
is deleted from MLflow too, so nothing can be rolled back to outside Palimpsest either.

How: a promotion or purge marks the model's `RegistryMirror` row pending in its own
transaction and enqueues a sync after commit. A sync reconciles (it makes MLflow match
Palimpsest: creates missing versions, deletes purged ones, moves the alias), so it is
idempotent, and a lost task or an MLflow outage only delays it: a failed sync never
blocks or undoes a promotion; it is retried with backoff (by its own task and by the
beat's sweep) until it succeeds, and is visible meanwhile in /metrics and the dashboard.

MLflow's own client is used (`pip install palimpsest[mlflow]`), with its HTTP retries
capped so that one attempt is short; the retries are ours.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import enqueue, session_scope
from app.core.settings import get_settings
from app.models import Job, MLModel, ModelVersion, RegistryMirror, RequestModel
from app.models.base import utcnow

log = logging.getLogger(__name__)
SYNC_TASK = "palimpsest.sync_registry_mirror"
SYSTEM = "integrations"
ALIAS = "production"
MIRRORED = ("production", "retired")  # versions that were promoted
LEASE = timedelta(seconds=120)
MAX_BACKOFF = timedelta(hours=1)
FIRST_BACKOFF = timedelta(seconds=15)


def enabled() -> bool:
    return bool(get_settings().mlflow_tracking_uri)


def mark(session: Session, model: MLModel) -> None:
    """The model's mirror is stale (a promotion, rollback or purge in this transaction):
    sync it after commit. Nothing happens when no MLflow is configured."""
    if not enabled():
        return
    row = session.get(RegistryMirror, model.id)
    if row is None:
        row = RegistryMirror(model_id=model.id, target="mlflow", versions={})
        session.add(row)
    if row.status == "synced":
        row.failures = 0
    row.status = "pending" if row.status != "failing" else "failing"
    row.next_attempt_at = utcnow()
    row.updated_at = utcnow()
    enqueue(session, SYNC_TASK, model.id)


@dataclass(frozen=True)
class Wanted:
    """What MLflow must show for one model."""

    name: str
    model_id: str
    keep: dict[int, dict[str, str]]  # version -> tags, for every promoted, unpurged one
    purged: set[int]
    production: int | None
    sources: dict[int, str]


def _wanted(session: Session, model: MLModel) -> Wanted:
    versions = session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version)
    ).all()
    keep: dict[int, dict[str, str]] = {}
    sources: dict[int, str] = {}
    store_root = get_settings().artifact_root
    for v in versions:
        if v.status not in MIRRORED:
            continue
        reqs = session.scalars(
            select(RequestModel).where(
                RequestModel.model_id == model.id, RequestModel.to_version == v.version
            )
        ).all()
        job = session.get(Job, v.created_by_job) if v.created_by_job else None
        method = next((r.method for r in reqs if r.method), None)
        if method is None and job is not None:
            method = str(job.result.get("method") or job.method or job.kind)
        keep[v.version] = {
            "palimpsest.version": str(v.version),
            "palimpsest.method": method or "train",
            "palimpsest.requests": ",".join(sorted({r.request_id for r in reqs})),
            "palimpsest.model_id": model.id,
        }
        sources[v.version] = _source(store_root, v.manifest_path)
    purged = {v.version for v in versions if v.status == "purged"}
    return Wanted(model.name, model.id, keep, purged, model.production_version, sources)


def _source(root: str, manifest_path: str | None) -> str:
    """Where the version's manifest lives: the store's URI when it has a scheme (s3://),
    else a `palimpsest:` URI (MLflow refuses local paths outside its own runs)."""
    rel = manifest_path or ""
    if "://" in root:
        return f"{root.rstrip('/')}/{rel}"
    return f"palimpsest://artifacts/{rel}"


def _client(uri: str) -> Any:
    # One attempt is short and its failure is ours to retry (with backoff, by the beat):
    # MLflow's client would otherwise retry for minutes inside one task.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:  # pragma: no cover - the extra is not installed
        raise RuntimeError(
            "PALIMPSEST_MLFLOW_TRACKING_URI is set but mlflow is not installed "
            "(pip install 'palimpsest[mlflow]')"
        ) from exc
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def reconcile(client: Any, wanted: Wanted) -> tuple[dict[str, str], str | None]:
    """Make MLflow match `wanted`; returns {palimpsest version: mlflow version} and the
    MLflow version the alias points at."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(wanted.name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            wanted.name,
            tags={"palimpsest.model_id": wanted.model_id},
            description="Mirrored by Palimpsest: versions promoted there; erased ones deleted.",
        )
    existing: dict[int, Any] = {}
    for mv in client.search_model_versions(f"name='{wanted.name}'"):
        tag = (mv.tags or {}).get("palimpsest.version")
        if tag is not None and tag.isdigit():
            existing[int(tag)] = mv
    for version in sorted(set(existing) & wanted.purged):
        client.delete_model_version(wanted.name, existing.pop(version).version)
    for version, tags in sorted(wanted.keep.items()):
        if version not in existing:
            existing[version] = client.create_model_version(
                wanted.name,
                wanted.sources[version],
                tags=tags,
                description=f"Palimpsest version {version} of model {wanted.name}",
                await_creation_for=0,  # its source is not copied: READY at once
            )
    mapping = {str(v): str(mv.version) for v, mv in sorted(existing.items())}
    alias: str | None = None
    if wanted.production is not None and wanted.production in existing:
        alias = str(existing[wanted.production].version)
        client.set_registered_model_alias(wanted.name, ALIAS, alias)
    else:
        try:
            client.delete_registered_model_alias(wanted.name, ALIAS)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in (
                "RESOURCE_DOES_NOT_EXIST",
                "INVALID_PARAMETER_VALUE",
            ):
                raise
    return mapping, alias


def backoff(failures: int) -> timedelta:
    wait: timedelta = FIRST_BACKOFF * (2 ** max(0, min(failures - 1, 16)))
    return min(MAX_BACKOFF, wait)


def sync(model_id: str) -> str:
    """One attempt for one model; returns the mirror's status afterwards."""
    uri = get_settings().mlflow_tracking_uri
    if not uri:
        return "disabled"
    with session_scope() as s:
        row = s.get(RegistryMirror, model_id)
        model = s.get(MLModel, model_id)
        if row is None or model is None or row.status == "synced":
            return "skipped" if row is None else row.status
        now = utcnow()
        if row.next_attempt_at is not None and row.next_attempt_at > now + timedelta(seconds=2):
            return "skipped"  # not due (a duplicate, or a retry the beat will send)
        row.next_attempt_at = now + LEASE
        wanted = _wanted(s, model)
        stamp = row.updated_at
    error: str | None = None
    mapping: dict[str, str] = {}
    alias: str | None = None
    try:
        mapping, alias = reconcile(_client(uri), wanted)
    except Exception as exc:  # any failure to reach or satisfy MLflow is retried
        error = f"{type(exc).__name__}: {exc}"[:1000]
    with session_scope() as s:
        row = s.get(RegistryMirror, model_id)
        if row is None:
            return "skipped"
        now = utcnow()
        row.attempts += 1
        if error is None:
            row.versions, row.alias_version, row.last_error = mapping, alias, None
            row.synced_at = now
            # A promotion marked it again while this attempt ran: one more sync is due.
            if row.updated_at == stamp:
                row.status, row.failures, row.next_attempt_at = "synced", 0, None
            else:
                row.status, row.next_attempt_at = "pending", now
                enqueue(s, SYNC_TASK, model_id)
        else:
            row.failures += 1
            row.status, row.last_error = "failing", error
            wait = backoff(row.failures)
            row.next_attempt_at = now + wait
            enqueue(s, SYNC_TASK, model_id, countdown=wait.total_seconds())
            if row.failures in (1, 5, 20):  # not one audit row per retry
                audit.record(
                    s,
                    actor=SYSTEM,
                    action="integration.mlflow_sync_failed",
                    entity_type="model",
                    entity_id=model_id,
                    data={"failures": row.failures, "error": error},
                )
        log.info("mlflow mirror %s: %s (%s)", model_id, row.status, error or alias)
        return row.status


def sweep(limit: int = 200) -> int:
    """Beat: send the syncs that are due (retries whose task was lost, marks whose task
    never went out). A no-op without PALIMPSEST_MLFLOW_TRACKING_URI."""
    if not enabled():
        return 0
    with session_scope() as s:
        ids = s.scalars(
            select(RegistryMirror.model_id)
            .where(
                RegistryMirror.status != "synced",
                RegistryMirror.next_attempt_at < utcnow() - timedelta(seconds=5),
            )
            .limit(limit)
        ).all()
        for model_id in ids:
            enqueue(s, SYNC_TASK, model_id)
        return len(ids)


def counts(session: Session) -> dict[str, int]:
    """Mirrors by status (for /metrics and the dashboard)."""
    out = {"pending": 0, "synced": 0, "failing": 0}
    for status in session.scalars(select(RegistryMirror.status)):
        out[status] = out.get(status, 0) + 1
    return out
