"""Certificates: what was done for a completed request, signed so an outsider can check it.

One per request, issued in the same transaction that completes it, never rewritten. The
document holds no raw personal data: a subject appears only as its keyed HMAC.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core import signing
from app.core.errors import NotFound
from app.core.settings import Settings, get_settings
from app.core.storage import ArtifactStore
from app.models import (
    Certificate,
    DeletionRequest,
    Job,
    MLModel,
    ModelVersion,
    Report,
    RequestModel,
)
from app.models.base import utcnow
from app.registry import artifacts
from app.verification.service import check_status

FORMAT = "palimpsest.certificate/v1"
ISSUER = "palimpsest"
EXACT_GUARANTEE = "exact: no retained version trained on the records"
APPROXIMATE_GUARANTEE = "approximate: verified empirically"
CERTIFIED_GUARANTEE = "approximate: certified removal, (epsilon, delta)-indistinguishable"
# Methods that rebuild weights without the records: exact whatever the result says.
EXACT_METHODS = frozenset({"sisa", "retrain", "feature_retrain", "none"})
CERTIFIED_FIELDS = ("epsilon", "delta", "bound", "cumulative_bound", "budget", "budget_left")
COST_FIELDS = ("wall_seconds", "device", "device_seconds", "retrain_estimate_seconds")


def signing_key(settings: Settings | None = None) -> Ed25519PrivateKey:
    return signing.load_or_create_key((settings or get_settings()).signing_key_file)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number becomes null rather than a failure."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sha256(read: Callable[[str], bytes], rel: str) -> str | None:
    try:
        return hashlib.sha256(read(rel)).hexdigest()
    except FileNotFoundError:
        return None  # purged since: the certificate says so rather than failing


def _manifest_sha(store: ArtifactStore, mv: ModelVersion) -> str | None:
    """Recorded when the manifest was written; versions from before that are hashed."""
    if not mv.manifest_path or not store.exists(mv.manifest_path):
        return None
    recorded = mv.manifest.get("artifact_sha256")
    return str(recorded) if recorded else _sha256(store.read_bytes, mv.manifest_path)


def _artifact_hashes(store: ArtifactStore, mv: ModelVersion) -> dict[str, Any]:
    """SHA-256 of the version's manifest file and of every checkpoint its shards use."""
    ckpt = artifacts.checkpoint_store(store, mv.model_id)
    shards = []
    for entry in mv.manifest.get("entries", []):
        keys = list(dict.fromkeys([*entry.get("checkpoint_keys", []), entry["final_key"]]))
        shards.append(
            {
                "shard": entry["shard"],
                "final_key": entry["final_key"],
                "checkpoints": {k: ckpt.digest(k) for k in keys},
            }
        )
    return {
        "manifest": {
            "path": mv.manifest_path,
            "sha256": _manifest_sha(store, mv),
        },
        "shards": shards,
    }


def _guarantee(method: str | None, result: dict[str, Any]) -> dict[str, Any]:
    name = method or str(result.get("method") or "")
    approximate = bool(result.get("approximate", name not in EXACT_METHODS))
    if not approximate:
        return {"exactness": "exact", "guarantee": EXACT_GUARANTEE}
    if name == "certified":
        return {
            "exactness": "approximate",
            "guarantee": CERTIFIED_GUARANTEE,
            "certified": {k: _finite(result.get(k)) for k in CERTIFIED_FIELDS},
        }
    return {"exactness": "approximate", "guarantee": APPROXIMATE_GUARANTEE}


def _report_summary(report: Report | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "id": report.id,
        "passed": bool(report.passed),
        "decision": report.decision,
        "checks": {
            name: check_status(c) == "pass" if isinstance(c, dict) else None
            for name, c in sorted(report.checks.items())
        },
        # pass / fail / inconclusive per check, and why a check could not tell.
        "check_status": {name: check_status(c) for name, c in sorted(report.checks.items())},
        "reasons": {
            name: str(c.get("reason"))
            for name, c in sorted(report.checks.items())
            if isinstance(c, dict) and c.get("reason")
        },
        **_forgetting_evidence(report.checks),
    }


def _forgetting_evidence(checks: dict[str, Any]) -> dict[str, Any]:
    """What shows the forgetting: the attack (it had power and found nothing), or, when
    the attack could not tell, the lineage proof (exact methods) or the model's policy."""
    c = checks.get("forgetting")
    if not isinstance(c, dict):
        return {}
    status = check_status(c)
    if status == "pass":
        return {"forgetting_evidence": "membership attack with power on the baseline"}
    if status == "inconclusive":
        by = str((c.get("metrics") or {}).get("decided_by") or "")
        text = {
            "lineage": "the attack could not tell (no power on the baseline): removal rests "
            "on the lineage proof of an exact method",
            "policy": "the attack could not tell (no power on the baseline): accepted by "
            "the model's policy",
        }.get(by, "the attack could not tell (no power on the baseline)")
        return {"forgetting_evidence": text}
    return {"forgetting_evidence": "the membership attack failed the candidate"}


def _model_entry(session: Session, store: ArtifactStore, rm: RequestModel) -> dict[str, Any]:
    model = session.get(MLModel, rm.model_id)
    job = session.get(Job, rm.job_id) if rm.job_id else None
    result = dict((job.result or {}).get("unlearning") or {}) if job is not None else {}
    mv = None
    if rm.to_version is not None:
        mv = session.scalars(
            select(ModelVersion).where(
                ModelVersion.model_id == rm.model_id, ModelVersion.version == rm.to_version
            )
        ).first()
    report = session.get(Report, rm.report_id) if rm.report_id else None
    return {
        "model": model.name if model is not None else rm.model_id,
        "model_id": rm.model_id,
        "status": rm.status,
        "from_version": rm.from_version,
        "to_version": rm.to_version,
        "method": rm.method,
        **_guarantee(rm.method, result),
        "job_id": rm.job_id,
        "cost": {k: _finite((job.cost or {}).get(k)) for k in COST_FIELDS} if job else None,
        "report": _report_summary(report),
        "artifacts": _artifact_hashes(store, mv) if mv is not None else None,
        **(
            {
                "statement": "the request's records reached this model only in its held-out "
                "(test) split: no version of it trained on them, so nothing was unlearned"
            }
            if rm.status == "not_trained"
            else {}
        ),
    }


def _target(req: DeletionRequest) -> dict[str, Any]:
    """What was erased, without raw personal data (a subject only by its HMAC key)."""
    if req.kind == "subject":
        return {"subject_key": req.subject_key}
    if req.kind == "records":
        return {"records": len(req.record_ids or []), "dataset_id": req.dataset_id}
    if req.kind == "source":
        return {"source": req.source}
    return {"feature": req.feature, "model": req.model_name}


def build(
    session: Session,
    store: ArtifactStore,
    req: DeletionRequest,
    erasure: dict[str, Any],
    issuer_key_id: str,
) -> dict[str, Any]:
    """The certificate body (unsigned)."""
    rms = session.scalars(
        select(RequestModel).where(RequestModel.request_id == req.id).order_by(RequestModel.id)
    ).all()
    held = bool(req.n_records) or bool(rms) or int(erasure.get("records", 0)) > 0
    return {
        "format": FORMAT,
        "request": {
            "id": req.id,
            "kind": req.kind,
            "status": req.status,
            "reason": req.reason,
            "external_ref": req.external_ref,
            "received_at": _iso(req.received_at),
            "due_at": _iso(req.due_at),
            "extended": req.extended_at is not None,
            "completed_at": _iso(req.completed_at),
            "records": req.n_records,
        },
        "subject": _target(req),
        "models": [_model_entry(session, store, rm) for rm in rms],
        "erasure": {
            # A target the service never held is accepted like any other (intake reveals
            # nothing about whose data exists); its certificate says so.
            "data_held": held,
            "statement": (
                "the request's data was erased from every model and store that held it"
                if held
                else "no data of the request's target was held: nothing had to be erased"
            ),
            "records_erased": int(erasure.get("records", 0)),
            "parquet_rows_removed": int(erasure.get("parquet_rows", 0)),
            "versions_purged": {
                str(k): sorted(int(v) for v in vs)
                for k, vs in sorted(dict(erasure.get("versions_purged", {})).items())
            },
        },
        "issued_at": _iso(utcnow()),
        "issuer": {"name": ISSUER, "key_id": issuer_key_id},
    }


def issue(
    session: Session,
    store: ArtifactStore,
    req: DeletionRequest,
    erasure: dict[str, Any],
    key: Ed25519PrivateKey | None = None,
) -> Certificate:
    """Sign and store the request's certificate; a second call returns the first one."""
    existing = session.get(Certificate, req.id)
    if existing is not None:
        return existing
    key = key or signing_key()
    kid = signing.key_id(key)
    signed = signing.sign(build(session, store, req, erasure, kid), key)
    cert = Certificate(request_id=req.id, key_id=kid, body=signed)
    session.add(cert)
    session.flush()
    audit.record(
        session,
        actor="worker",
        action="certificate.issued",
        entity_type="deletion_request",
        entity_id=req.id,
        data={
            "key_id": kid,
            "sha256": hashlib.sha256(signing.canonical_json(signed["certificate"])).hexdigest(),
        },
    )
    return cert


def get_signed(session: Session, req: DeletionRequest) -> dict[str, Any]:
    cert = session.get(Certificate, req.id)
    if cert is None:
        raise NotFound(
            f"request {req.id} has no certificate (status {req.status!r}): "
            "one is issued when the request completes",
            code="certificate_not_available",
        )
    return dict(cert.body)


def public_key_info(settings: Settings | None = None) -> dict[str, str]:
    key = signing_key(settings)
    return {
        "algorithm": signing.ALGORITHM,
        "key_id": signing.key_id(key),
        "public_key_pem": signing.public_pem(key),
    }
