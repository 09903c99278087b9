"""What workers do to a request: plan it, apply what its jobs report (`EVENTS`), advance
it as models finish, erase its data. The one writer of a request's status besides the
API's own actions (cancel, review)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import case, delete, or_, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.certificates import service as certificates
from app.core.chunks import in_chunks
from app.core.db import enqueue, session_scope
from app.core.outbox import PendingTask, sender
from app.core.storage import ArtifactStore
from app.datasets import service as datasets
from app.jobs import batching, routing
from app.models import (
    Dataset,
    DeletionRequest,
    Lineage,
    MLModel,
    Record,
    RequestModel,
    Source,
    Subject,
)
from app.pipeline import outputs
from app.pipeline.outcome import Outcome
from app.pipeline.spec import UnlearningConfig
from app.registry import references
from app.registry import service as registry
from app.requests import targets
from app.requests.states import TERMINAL
from app.requests.transitions import transition

log = logging.getLogger(__name__)
WORKER = "worker"


def target_record_ids(session: Session, req: DeletionRequest) -> list[int]:
    """Ids of the records a request covers that still exist."""
    return targets.record_ids(session, targets.Target.of(req))


# Planning a large target runs in steps of this many records, each its own short
# transaction, so the database's write lock (SQLite has one) is never held for long.
PLAN_STEP = 5000
# SQLite's busy handler polls (up to every 100 ms): a pause between steps lets waiting
# writers in rather than the next step taking the lock straight back.
SQLITE_PAUSE = 0.15


def _between_steps(session: Session) -> None:
    if session.get_bind().dialect.name == "sqlite":
        time.sleep(SQLITE_PAUSE)


def _open(session: Session, request_id: str) -> DeletionRequest | None:
    """The request, locked, while it still waits to be planned."""
    req = session.get(DeletionRequest, request_id, with_for_update=True)
    if req is None or req.status != "received":
        return None  # idempotent: already planned, cancelled or gone
    return req


def _reject_ambiguous(session: Session, req: DeletionRequest) -> bool:
    """Record ids found in several datasets must be narrowed with `dataset_id`."""
    if req.kind != "records":
        return False
    found = targets.matching_records(session, targets.Target.of(req))
    if len(found) == len({f[1] for f in found}):
        return False
    req.error = "some record ids exist in several datasets; name the dataset with 'dataset_id'"
    transition(session, req, "rejected", WORKER, reason=req.error)
    return True


def _datasets_of(session: Session, ids: list[int]) -> set[str]:
    out: set[str] = set()
    for chunk in in_chunks(ids):
        out |= set(
            session.scalars(select(Record.dataset_id).where(Record.id.in_(chunk)).distinct())
        )
    return out


def _still_training(session: Session, datasets_hit: set[str]) -> bool:
    # A model still training on these datasets read its data before the quarantine:
    # planning waits for it, so its first version is planned like any other.
    return (
        session.scalars(
            select(MLModel.id).where(
                MLModel.dataset_id.in_(datasets_hit), MLModel.status == "training"
            )
        ).first()
        is not None
    )


def _quarantine(session: Session, req: DeletionRequest, ids: list[int]) -> None:
    for chunk in in_chunks(ids):
        session.execute(
            update(Record)
            .where(Record.id.in_(chunk), Record.status == "active")
            .values(status="quarantined", quarantined_by=req.id)
        )


def _models_reached(session: Session, ids: list[int]) -> set[str]:
    models: set[str] = set()
    for chunk in in_chunks(ids):
        models |= set(
            session.scalars(
                select(Lineage.model_id)
                .where(
                    Lineage.record_id.in_(chunk),
                    Lineage.split == "train",
                    Lineage.to_version.is_(None),
                )
                .distinct()
            )
        )
    return models


def _models_not_trained(session: Session, ids: list[int], trained: set[str]) -> set[str]:
    """Models the records reach without having trained on them: rows of theirs are in a
    model's held-out (test) split only. Such a model is listed as `not_trained`."""
    models: set[str] = set()
    for chunk in in_chunks(ids):
        models |= set(
            session.scalars(
                select(Lineage.model_id)
                .where(Lineage.record_id.in_(chunk), Lineage.split == "test")
                .distinct()
            )
        )
    return models - trained


def plan_in_steps(request_id: str) -> None:
    """What the planning task runs: `plan` in one transaction for an ordinary target; a
    large one is resolved and quarantined in steps of `PLAN_STEP` records, each step in a
    transaction of its own that first checks the request is still waiting (a cancel in
    between wins), then attached to its models in a last short transaction."""
    with session_scope() as s:
        req = _open(s, request_id)
        if req is None or req.kind == "feature":
            big = False
        elif req.kind == "records":
            big = len(req.record_ids or []) > PLAN_STEP
        else:
            big = targets.count(s, targets.Target.of(req)) > PLAN_STEP
        target = targets.Target.of(req) if req is not None else None
    if not big or target is None:
        with session_scope() as s:
            plan(s, request_id)
        return
    ids: list[int] = []
    names = list(target.record_ids)
    if target.kind == "records":
        for i in range(0, len(names), PLAN_STEP):
            with session_scope() as s:
                _between_steps(s)
                part = targets.Target(
                    "records",
                    record_ids=tuple(names[i : i + PLAN_STEP]),
                    dataset_id=target.dataset_id,
                )
                found = targets.matching_records(s, part)
                if len(found) != len({f[1] for f in found}):
                    req = _open(s, request_id)
                    if req is not None:
                        _reject_ambiguous(s, req)
                    return
                ids.extend(f[0] for f in found)
        ids.sort()
    else:
        with session_scope() as s:
            ids = targets.record_ids(s, target)
    datasets_hit: set[str] = set()
    for i in range(0, len(ids), PLAN_STEP):
        with session_scope() as s:
            _between_steps(s)
            datasets_hit |= _datasets_of(s, ids[i : i + PLAN_STEP])
    with session_scope() as s:
        if _still_training(s, datasets_hit):
            enqueue(s, "palimpsest.plan_request", request_id, countdown=2.0)
            return
    models: set[str] = set()
    for i in range(0, len(ids), PLAN_STEP):
        with session_scope() as s:
            _between_steps(s)
            req = _open(s, request_id)
            if req is None:
                return  # cancelled meanwhile: its cancel released what was quarantined
            _quarantine(s, req, ids[i : i + PLAN_STEP])
            models |= _models_reached(s, ids[i : i + PLAN_STEP])
    with session_scope() as s:
        req = _open(s, request_id)
        if req is not None:
            _attach(s, req, ids, models, _models_not_trained(s, ids, models))


def plan(session: Session, request_id: str) -> None:
    """received -> planned: quarantine the records, find every model they reach, attach
    each model to an unlearning job (joining a pending one: that is batching, and the
    model's batching policy decides when the job is sent). One transaction: the caller's;
    `plan_in_steps` splits a large target."""
    req = _open(session, request_id)
    if req is None:
        return
    if req.kind == "feature":
        _plan_feature(session, req)
        return
    if _reject_ambiguous(session, req):
        return
    ids = target_record_ids(session, req)
    if _still_training(session, _datasets_of(session, ids)):
        enqueue(session, "palimpsest.plan_request", req.id, countdown=2.0)
        return
    _quarantine(session, req, ids)
    models = _models_reached(session, ids)
    _attach(session, req, ids, models, _models_not_trained(session, ids, models))


# -- planning many requests at once ----------------------------------------------------
#
# The intake commits requests in batches and asks for them to be planned together
# (`palimpsest.plan_requests`). Ordinary subject and source targets are resolved with a
# handful of queries for the whole batch (records, datasets, models still training,
# lineage), quarantined with one statement per run of them, and planned in one
# transaction; each request then goes through `_attach`, exactly as `plan` would take it.
# Records and feature requests in the batch go through `plan` itself, in the same
# transaction and in their place in the order (a record two requests cover is
# quarantined by the first, as one by one). Large targets (> PLAN_STEP records) and
# anything odd are planned after the batch by `plan_in_steps`, one by one.

# Requests planned per transaction by `plan_many` (a longer list runs in several).
PLAN_BATCH = 100


@dataclass
class _Resolved:
    """What a bulk-resolved request covers: its live record ids and their datasets."""

    ids: list[int] = field(default_factory=list)
    datasets: set[str] = field(default_factory=set)


def plan_many(request_ids: Sequence[str]) -> list[str]:
    """Plan every request in `request_ids` (those still `received`; the rest are skipped,
    as by `plan`), `PLAN_BATCH` per transaction. If a batch's transaction fails, nothing
    of it is kept and each of its requests is planned on its own, so one bad request
    costs the others nothing. Returns the ids whose planning failed even alone (the
    caller retries them one by one)."""
    unique = list(dict.fromkeys(request_ids))
    failed: list[str] = []
    for i in range(0, len(unique), PLAN_BATCH):
        part = unique[i : i + PLAN_BATCH]
        try:
            with session_scope() as s:
                alone = _plan_batch(s, part)
        except Exception:
            log.warning(
                "planning %d requests together failed; planning them one by one",
                len(part),
                exc_info=True,
            )
            alone = part
        for rid in alone:
            try:
                plan_in_steps(rid)
            except Exception:
                log.exception("planning request %s failed", rid)
                failed.append(rid)
    return failed


def retry_alone(request_ids: Sequence[str], countdown: float = 2.0) -> None:
    """Send each request its own `palimpsest.plan_request` task after `countdown`
    seconds (that task's own retries then apply); what cannot be sent is re-sent by
    the resume sweep (the request stays `received`)."""
    for rid in request_ids:
        sender().send(PendingTask("palimpsest.plan_request", (rid,), countdown=countdown))


def _plan_batch(session: Session, request_ids: list[str]) -> list[str]:
    """Plan the still-`received` ones of `request_ids` in this transaction, in the
    list's order; returns those left to `plan_in_steps` (large or odd targets)."""
    pos = {rid: i for i, rid in enumerate(request_ids)}
    # Locked in id order, so two batches sharing requests cannot deadlock on them.
    reqs = sorted(
        session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.id.in_(request_ids), DeletionRequest.status == "received")
            .order_by(DeletionRequest.id)
            .with_for_update()
        ),
        key=lambda r: pos[r.id],
    )
    resolved, large = _resolve(session, reqs)
    # Left to `plan_in_steps`: large targets, and a subject or source request naming none.
    alone = [
        r.id
        for r in reqs
        if r.id in large
        or (r.kind == "records" and len(r.record_ids or []) > PLAN_STEP)
        or (r.kind in ("subject", "source") and r.id not in resolved)
        or r.kind not in ("subject", "source", "records", "feature")
    ]
    skip = set(alone)
    bulk = [r for r in reqs if r.id in resolved]
    training = _training_datasets(session, {d for r in bulk for d in resolved[r.id].datasets})
    waiting = {r.id for r in bulk if resolved[r.id].datasets & training}
    reached, tested = _lineage_of(
        session, sorted({i for r in bulk if r.id not in waiting for i in resolved[r.id].ids})
    )
    run: list[DeletionRequest] = []
    for req in reqs:
        if req.id in skip:
            continue
        if req.id not in resolved:  # records or feature: `plan` itself, in its place
            _plan_run(session, run, resolved, reached, tested)
            run = []
            plan(session, req.id)
        elif req.id in waiting:
            enqueue(session, "palimpsest.plan_request", req.id, countdown=2.0)
        else:
            run.append(req)
    _plan_run(session, run, resolved, reached, tested)
    return alone


def _resolve(
    session: Session, reqs: list[DeletionRequest]
) -> tuple[dict[str, _Resolved], set[str]]:
    """The live records of the batch's subject and source requests, a query per chunk
    of subjects and of sources; and the requests whose target holds more than
    PLAN_STEP records (a large source is counted, never listed here)."""
    live = Record.status.in_(targets.LIVE)
    subjects: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    for r in reqs:
        if r.kind == "subject" and r.subject_key:
            subjects.setdefault(r.subject_key, []).append(r.id)
        elif r.kind == "source" and r.source:
            sources.setdefault(r.source, []).append(r.id)
    by_key: dict[str, _Resolved] = {k: _Resolved() for k in subjects}
    for chunk in in_chunks(sorted(subjects)):
        for key, rid, ds in session.execute(
            select(Subject.subject_key, Record.id, Record.dataset_id)
            .join(Subject, Subject.id == Record.subject_id)
            .where(Subject.subject_key.in_(chunk), live)
        ):
            by_key[key].ids.append(int(rid))
            by_key[key].datasets.add(str(ds))
    by_source: dict[str, _Resolved] = {}
    large = {
        rid for key, rids in subjects.items() if len(by_key[key].ids) > PLAN_STEP for rid in rids
    }
    if sources:
        sizes = targets.count_many(session, "source", set(sources))
        small = sorted(n for n in sources if sizes.get(n, 0) <= PLAN_STEP)
        large |= {rid for n in sources if n not in small for rid in sources[n]}
        by_source = {n: _Resolved() for n in small}
        for chunk in in_chunks(small):
            for name, rid, ds in session.execute(
                select(Source.name, Record.id, Record.dataset_id)
                .join(Source, Source.id == Record.source_id)
                .where(Source.name.in_(chunk), live)
            ):
                by_source[name].ids.append(int(rid))
                by_source[name].datasets.add(str(ds))
    out: dict[str, _Resolved] = {}
    for groups, found in ((subjects, by_key), (sources, by_source)):
        for name, rids in groups.items():
            hit = found.get(name)
            if hit is None:
                continue  # large: planned in steps
            hit.ids.sort()
            for rid in rids:
                if rid not in large:
                    out[rid] = _Resolved(list(hit.ids), set(hit.datasets))
    return out, large


def _training_datasets(session: Session, datasets_hit: set[str]) -> set[str]:
    """Which of these datasets a model is still training on (see `_still_training`)."""
    if not datasets_hit:
        return set()
    return set(
        session.scalars(
            select(MLModel.dataset_id)
            .where(MLModel.dataset_id.in_(sorted(datasets_hit)), MLModel.status == "training")
            .distinct()
        )
    )


def _lineage_of(
    session: Session, ids: list[int]
) -> tuple[dict[int, set[str]], dict[int, set[str]]]:
    """Per record: the models it reaches (trained on, open-ended: `_models_reached`) and
    those holding it in a test split (`_models_not_trained`)."""
    reached: dict[int, set[str]] = {}
    tested: dict[int, set[str]] = {}
    for chunk in in_chunks(ids):
        for rid, model_id, split, open_ended in session.execute(
            select(
                Lineage.record_id, Lineage.model_id, Lineage.split, Lineage.to_version.is_(None)
            ).where(
                Lineage.record_id.in_(chunk),
                or_(
                    Lineage.split == "test",
                    (Lineage.split == "train") & Lineage.to_version.is_(None),
                ),
            )
        ):
            if split == "train" and open_ended:
                reached.setdefault(int(rid), set()).add(str(model_id))
            elif split == "test":
                tested.setdefault(int(rid), set()).add(str(model_id))
    return reached, tested


def _plan_run(
    session: Session,
    run: list[DeletionRequest],
    resolved: dict[str, _Resolved],
    reached: dict[int, set[str]],
    tested: dict[int, set[str]],
) -> None:
    """Quarantine a run of bulk-resolved requests' records (each record by the first
    request of the run covering it, as one by one), then attach each to its models."""
    if not run:
        return
    owner: dict[int, str] = {}
    for req in run:
        for rid in resolved[req.id].ids:
            owner.setdefault(rid, req.id)
    for chunk in in_chunks(sorted(owner)):
        # Locked in id order first (concurrent batches covering the same records take
        # them in one order), then quarantined with one statement.
        active = list(
            session.scalars(
                select(Record.id)
                .where(Record.id.in_(chunk), Record.status == "active")
                .order_by(Record.id)
                .with_for_update()
            )
        )
        if not active:
            continue
        owners = {owner[i] for i in active}
        by = (
            owners.pop()
            if len(owners) == 1
            else case({i: owner[i] for i in active}, value=Record.id)
        )
        session.execute(
            update(Record)
            .where(Record.id.in_(active), Record.status == "active")
            .values(status="quarantined", quarantined_by=by)
            .execution_options(synchronize_session=False)
        )
    for req in run:
        ids = resolved[req.id].ids
        models = {m for i in ids for m in reached.get(i, ())}
        untrained = {m for i in ids for m in tested.get(i, ())} - models
        _attach(session, req, ids, models, untrained)


def _attach(
    session: Session,
    req: DeletionRequest,
    ids: list[int],
    models: set[str],
    untrained: set[str] | None = None,
) -> None:
    for model_id in sorted(untrained or ()):
        # Reached, never trained on: nothing to unlearn; the erasure still drops the
        # model's kept outputs on these rows. Listed so the request says so.
        model = session.get(MLModel, model_id)
        assert model is not None
        session.add(
            RequestModel(
                request_id=req.id,
                model_id=model_id,
                status="not_trained",
                from_version=model.production_version,
                to_version=model.production_version,
                method="none",
            )
        )
    for model_id in sorted(models):
        model = session.get(MLModel, model_id)
        assert model is not None
        # Join the model's pending job (batching) or open the next one.
        job = batching.open_job(session, model)
        new = job is None
        if job is None:
            # Held or sent by the batching policy below, not at creation.
            job = routing.create(
                session,
                kind="unlearn",
                model_id=model_id,
                method=UnlearningConfig.from_dict(model.config["unlearning"]).method,
                send_now=False,
            )
        session.add(
            RequestModel(
                request_id=req.id,
                model_id=model_id,
                status="planned",
                job_id=job.id,
                from_version=model.production_version,
            )
        )
        session.flush()
        batching.schedule(session, job, model, new=new)
    req.n_records = len(ids)
    transition(session, req, "planned", WORKER, records=len(ids), models=len(models))
    if not models:
        transition(session, req, "erasing", WORKER)
        enqueue(session, "palimpsest.erase_request", req.id)


def _plan_feature(session: Session, req: DeletionRequest) -> None:
    """A feature request quarantines no records: one job of its own on the named model."""
    model = session.scalars(select(MLModel).where(MLModel.name == req.model_name)).first()
    if model is None or model.status == "failed" or model.production_version is None:
        if model is not None and model.status == "training":
            enqueue(session, "palimpsest.plan_request", req.id, countdown=2.0)
            return
        req.error = f"model {req.model_name!r} has no production version"
        transition(session, req, "rejected", WORKER, reason=req.error)
        return
    job = routing.create(session, kind="unlearn", model_id=model.id, method="feature")
    session.add(
        RequestModel(
            request_id=req.id,
            model_id=model.id,
            status="planned",
            job_id=job.id,
            from_version=model.production_version,
        )
    )
    transition(session, req, "planned", WORKER, feature=req.feature, models=1)


def advance(session: Session, request_ids: list[str]) -> None:
    """After a job: a request whose every model holds a promoted version moves to
    `erasing`; one with a model in review moves to `needs_review`."""
    for rid in request_ids:
        req = session.get(DeletionRequest, rid)
        if req is None or req.status in TERMINAL or req.status == "erasing":
            continue
        statuses = set(
            session.scalars(select(RequestModel.status).where(RequestModel.request_id == rid))
        )
        if statuses <= {"promoted", "not_trained"}:
            transition(session, req, "erasing", WORKER)
            enqueue(session, "palimpsest.erase_request", rid)
        elif "failed" in statuses:
            transition(session, req, "failed", WORKER)
        elif "needs_review" in statuses:
            transition(session, req, "needs_review", WORKER)


def _requests(session: Session, request_ids: list[str]) -> list[DeletionRequest]:
    return list(session.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))))


def _job_rows(session: Session, job_id: str) -> list[RequestModel]:
    return list(session.scalars(select(RequestModel).where(RequestModel.job_id == job_id)))


class RequestLifecycle:
    """`RequestEvents` for the pipeline: what a job's progress means for its requests."""

    def started(self, session: Session, job_id: str, stage: str, from_version: int) -> None:
        rms = _job_rows(session, job_id)
        for rm in rms:
            rm.status = stage
            # "Before" is the version this job starts from (an earlier job may have
            # moved production on since the request was planned).
            rm.from_version = from_version
        for req in _requests(session, sorted({rm.request_id for rm in rms})):
            if req.status in TERMINAL or req.status == "erasing":
                continue
            if stage == "unlearning" and req.status == "planned":
                transition(session, req, "unlearning", WORKER, job_id=job_id)
            elif stage == "retraining":
                transition(session, req, "retraining", WORKER, job_id=job_id)

    def verifying(self, session: Session, job_id: str) -> None:
        rms = _job_rows(session, job_id)
        for rm in rms:
            rm.status = "verifying"
        for req in _requests(session, sorted({rm.request_id for rm in rms})):
            if req.status in ("planned", "unlearning", "retraining"):
                transition(session, req, "verifying", WORKER, job_id=job_id)

    def concluded(self, session: Session, outcome: Outcome) -> None:
        for rm in _job_rows(session, outcome.job_id):
            if outcome.decision == "nothing_to_forget":
                rm.status, rm.to_version, rm.method = "promoted", outcome.version, "none"
                continue
            rm.to_version, rm.method, rm.report_id = (
                outcome.version,
                outcome.method,
                outcome.report_id,
            )
            if outcome.retrain_job_id is not None:
                rm.status, rm.job_id = "retraining", outcome.retrain_job_id
            else:
                rm.status = "promoted" if outcome.decision == "promote" else "needs_review"
        if outcome.retrain_job_id is not None:
            for req in _requests(session, outcome.request_ids):
                if req.status not in TERMINAL:
                    transition(session, req, "retraining", WORKER, job_id=outcome.retrain_job_id)
        else:
            advance(session, outcome.request_ids)

    def failed(self, session: Session, job_id: str, error: str) -> None:
        rms = _job_rows(session, job_id)
        for rm in rms:
            rm.status = "failed"
        for req in _requests(session, sorted({rm.request_id for rm in rms})):
            req.error = f"job {job_id} failed: {error[:500]}"
            transition(session, req, "failed", WORKER, job_id=job_id)


EVENTS = RequestLifecycle()


def erase(session: Session, store: ArtifactStore, request_id: str) -> None:
    """erasing -> completed: rows and Parquet bytes physically removed, and the artifacts
    of every version trained on them purged (no rollback can bring them back)."""
    req = session.get(DeletionRequest, request_id, with_for_update=True)
    if req is None or req.status != "erasing":
        return
    ids = target_record_ids(session, req)
    by_dataset: dict[str, dict[int, list[int]]] = {}
    for chunk in in_chunks(ids):
        for rid, ds_id, part in session.execute(
            select(Record.id, Record.dataset_id, Record.partition).where(Record.id.in_(chunk))
        ):
            by_dataset.setdefault(ds_id, {}).setdefault(part, []).append(rid)
    # Versions that were trained on these records: purge their artifacts.
    reached: dict[str, set[int]] = {}
    for chunk in in_chunks(ids):
        for model_id, lo, hi in session.execute(
            select(Lineage.model_id, Lineage.from_version, Lineage.to_version).where(
                Lineage.record_id.in_(chunk), Lineage.split == "train"
            )
        ):
            model = session.get(MLModel, model_id)
            top = hi if hi is not None else (model.production_version if model else lo) or lo
            reached.setdefault(model_id, set()).update(range(lo, top + 1))
    # A model that held one of these rows keeps shard outputs on its test rows and on a
    # sample of its training rows, predictions on them included: they lose those rows.
    scored: dict[str, list[int]] = {}
    for chunk in in_chunks(ids):
        for model_id, rid in session.execute(
            select(Lineage.model_id, Lineage.record_id).where(Lineage.record_id.in_(chunk))
        ):
            scored.setdefault(model_id, []).append(int(rid))
    for model_id in sorted(scored):
        outputs.drop_rows(store, model_id, sorted(set(scored[model_id])))
    for model_id, versions in reached.items():
        registry.purge_versions(session, store, model_id, versions, WORKER)
        # Reference models (forgetting-check shadows) trained on these records go too.
        references.drop_trained_on(store, model_id, ids)
    erased = 0
    for ds_id, parts in by_dataset.items():
        ds = session.get(Dataset, ds_id, with_for_update=True)  # serialise rewrites of a dataset
        assert ds is not None
        all_ids = sorted(i for v in parts.values() for i in v)
        erased += datasets.erase_from_partitions(store, ds, all_ids, set(parts))
        for chunk in in_chunks(all_ids):
            session.execute(delete(Lineage).where(Lineage.record_id.in_(chunk)))
            session.execute(delete(Record).where(Record.id.in_(chunk)))
    if req.kind == "subject" and req.subject_key:
        session.execute(delete(Subject).where(Subject.subject_key == req.subject_key))
    if req.kind == "source" and req.source:
        session.execute(update(Source).where(Source.name == req.source).values(status="withdrawn"))
    erasure = {
        "records": len(ids),
        "parquet_rows": erased,
        "versions_purged": {k: sorted(v) for k, v in reached.items()},
    }
    audit.record(
        session,
        actor=WORKER,
        action="request.erased",
        entity_type="deletion_request",
        entity_id=req.id,
        data=erasure,
    )
    transition(session, req, "completed", WORKER)
    # Same transaction as the completion: no completed request without its certificate.
    # Issued after the transition so the certificate carries the exact `completed_at`.
    certificates.issue(session, store, req, erasure)
