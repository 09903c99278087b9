"""JobInputs: a job's inputs built once, every split a view of one conversion, a fanned
out shard reading only its rows, and a snapshot that rebuilds the same inputs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.datasets import service as datasets
from app.datasets.warm import WARM, WarmDatasets
from app.jobs import routing
from app.ml.data import TabularData
from app.models import Job, MLModel, Record
from app.pipeline.inputs import JobInputs, build
from app.pipeline.outcome import Outcome
from app.pipeline.spec import ModelSpec, UnlearningConfig
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, create_model, make_csv, upload_dataset


class Recorder:
    """RequestEvents that only remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def started(self, session: object, job_id: str, stage: str, from_version: int) -> None:
        self.calls.append(("started", (job_id, stage, from_version)))

    def verifying(self, session: object, job_id: str) -> None:
        self.calls.append(("verifying", job_id))

    def concluded(self, session: object, outcome: Outcome) -> None:
        self.calls.append(("concluded", outcome))

    def failed(self, session: object, job_id: str, error: str) -> None:
        self.calls.append(("failed", (job_id, error)))


def _inputs(env: AppEnv, events: Recorder) -> JobInputs:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=40, rows_per_subject=3))
    create_model(env.client, admin, ds["id"], unlearning={"mode": "sisa", "shards": 3, "slices": 2})
    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(admin),
        json={"kind": "subject", "subject_id": "subj-0002"},
    )
    assert r.status_code == 202
    with session_scope() as s:
        model = s.scalars(select(MLModel)).one()
        job = routing.create(s, kind="unlearn", model_id=model.id, method="sisa", send_now=False)
        return build(s, job, "unlearning", events)


def test_inputs_are_built_once_and_split_without_rereading(
    env: AppEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Recorder()
    inputs = _inputs(env, events)
    assert events.calls == [("started", (inputs.job_id, "unlearning", 1))]
    reads: list[str] = []
    real = datasets.read_partitions
    monkeypatch.setattr(
        datasets, "read_partitions", lambda store, ds: reads.append(ds.id) or real(store, ds)
    )
    WARM.drop()  # a worker that has not read this dataset yet
    retained, test, members = inputs.retained(), inputs.test(), inputs.members()
    assert len(reads) == 1 and inputs.phases.parquet_reads == 1
    assert inputs.phases.warm_reads == 0
    assert np.array_equal(retained.record_ids, inputs.ids[inputs.retained_mask])
    assert np.array_equal(test.record_ids, inputs.test_ids)
    assert set(members.record_ids) <= set(retained.record_ids)
    # Every split lines up with the lineage layout it came from.
    assert len(retained) + len(test) == len(inputs.ids)
    assert "load" in inputs.phases.seconds


def test_the_next_job_takes_its_rows_from_the_warm_copy_which_loses_erased_rows(
    env: AppEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _inputs(env, Recorder())
    WARM.drop()
    cold = first.retained()
    assert first.phases.parquet_reads == 1
    reads: list[str] = []
    real = datasets.read_partitions
    monkeypatch.setattr(
        datasets, "read_partitions", lambda store, ds: reads.append(ds.id) or real(store, ds)
    )
    with session_scope() as s:
        job = s.get(Job, first.job_id)
        assert job is not None
        second = build(s, job, "unlearning", Recorder())
    warm = second.retained()
    # No storage read: the same rows, converted alike, from this worker's copy.
    assert reads == [] and second.phases.parquet_reads == 0 and second.phases.warm_reads == 1
    assert np.array_equal(warm.record_ids, cold.record_ids)
    assert np.array_equal(warm.labels, cold.labels)
    for name, col in cold.columns.items():
        assert np.array_equal(warm.columns[name], col), name
    # Erasing rows from the dataset's partitions takes them out of the warm copy too.
    held = WARM.held()[first.ds.id]
    gone = [int(i) for i in cold.record_ids[:3]]
    with session_scope() as s:
        parts = s.scalars(select(Record.partition).where(Record.id.in_(gone))).all()
    assert datasets.erase_from_partitions(first.store, first.ds, gone, set(parts)) == len(gone)
    assert WARM.held()[first.ds.id] == held - len(gone)
    # A row the copy does not hold is never made up: the job reads storage instead.
    assert WARM.rows(first.ds.id, np.asarray(gone), lambda: None, ttl=60.0) is None
    assert first.ds.id not in WARM.held()


def test_a_warm_copy_unused_for_its_time_is_dropped_by_a_timer() -> None:
    cache = WarmDatasets()
    data = TabularData(
        record_ids=np.arange(5, dtype=np.int64),
        columns={"x": np.arange(5, dtype=np.float64)},
        labels=np.zeros(5, dtype=np.int64),
    )
    got = cache.rows("ds", np.asarray([1, 3]), lambda: data, ttl=0.2)
    assert got is not None and list(got[0].record_ids) == [1, 3] and got[1] is False
    again = cache.rows("ds", np.asarray([4]), lambda: None, ttl=0.2)
    assert again is not None and again[1] is True and cache.loads == 1
    # The same rows asked again are the same arrays (what is computed per array is kept).
    same = cache.rows("ds", np.asarray([4]), lambda: None, ttl=0.2)
    assert same is not None and same[0] is again[0]
    others = cache.rows("ds", np.asarray([0, 2]), lambda: None, ttl=0.2)
    assert others is not None
    cache.drop_rows("ds", [4])
    # Rows taken without an erased one are still those rows: the same arrays again.
    kept = cache.rows("ds", np.asarray([0, 2]), lambda: None, ttl=0.2)
    assert kept is not None and kept[0] is others[0]
    gone = cache.rows("ds", np.asarray([4]), lambda: None, ttl=0.2)
    assert gone is None  # erased: neither the copy nor the rows taken from it serve it
    assert cache.held() == {}
    cache.rows("ds", np.asarray([1, 3]), lambda: data, ttl=0.2)
    deadline = time.monotonic() + 10
    while cache.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    # Nobody asked again: the timer let the rows go.
    assert cache.held() == {}


def test_a_shard_reads_only_its_rows_and_the_snapshot_round_trips(env: AppEnv) -> None:
    inputs = _inputs(env, Recorder())
    for shard in range(3):
        data, slices = inputs.shard_rows(shard)
        mask = inputs.retained_mask & (inputs.shard == shard)
        assert np.array_equal(data.record_ids, inputs.ids[mask])
        assert np.array_equal(slices, inputs.slc[mask])
    again = JobInputs.from_snapshot(json.loads(inputs.dumps()))
    assert again.spec == inputs.spec and again.request_ids == inputs.request_ids
    for name in ("ids", "shard", "slc", "is_train", "is_active"):
        assert np.array_equal(getattr(again, name), getattr(inputs, name))
    assert again.manifest.to_dict() == inputs.manifest.to_dict()


def test_model_spec_parses_the_stored_body_once(env: AppEnv) -> None:
    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=20))
    create_model(
        env.client,
        admin,
        ds["id"],
        train=False,
        architecture={"kind": "logreg"},
        unlearning={"mode": "monolithic", "strategy": "finetune"},
        verification={"fairness_max_drop": 0.1, "reference_models": 3},
    )
    with session_scope() as s:
        model = s.scalars(select(MLModel)).one()
        spec = ModelSpec.of(model.id, model.config)
    assert spec.unlearning == UnlearningConfig.from_dict(model.config["unlearning"])
    assert not spec.unlearning.is_sisa and spec.unlearning.method == "finetune"
    assert (spec.sisa.shards, spec.sisa.slices) == (1, 1)
    assert spec.verification.fairness_max_drop == 0.1
    assert spec.verification.reference_models == 3
    assert spec.n_classes == len(model.config["resolved"]["label_classes"])


@pytest.mark.parametrize(
    ("kind", "method", "task"),
    [
        ("train", "sisa", "palimpsest.train_model"),
        ("unlearn", "sisa", "palimpsest.run_unlearning"),
        ("unlearn", "neggrad_plus", "palimpsest.run_unlearning"),
        ("unlearn", "feature", "palimpsest.run_feature"),
        ("retrain", "retrain", "palimpsest.run_retrain"),
    ],
)
def test_one_table_routes_every_job(kind: str, method: str, task: str) -> None:
    assert routing.task_for(kind, method) == (task, "gpu")


def test_an_unknown_kind_is_not_routed_anywhere() -> None:
    with pytest.raises(ValueError, match="no task"):
        routing.task_for("bake", None)


def test_jobs_are_created_and_sent_after_commit(env: AppEnv) -> None:
    from app.core import outbox

    admin = create_key("admin")
    ds = upload_dataset(env.client, admin, "people", make_csv(n_subjects=20))
    create_model(env.client, admin, ds["id"], train=False)
    sent: list[outbox.PendingTask] = []

    class Capture:
        def send(self, task: outbox.PendingTask) -> None:
            sent.append(task)

        def chord(self, header: object, callback: outbox.PendingTask) -> None:
            raise AssertionError("no chord here")

    previous = outbox.sender()
    outbox.register_sender(Capture())
    try:
        with session_scope() as s:
            model = s.scalars(select(MLModel)).one()
            job = routing.create_retrain(s, model.id, "because", {"flagged": []})
            assert sent == []  # nothing leaves before the commit
            job_id = job.id
        assert [(t.name, t.args, t.queue) for t in sent] == [
            ("palimpsest.run_retrain", (job_id,), "gpu")
        ]
        with session_scope() as s:
            stored = s.get(Job, job_id)
            assert stored is not None and stored.result["mitigation"] == {"flagged": []}
            routing.create(s, kind="unlearn", model_id=model.id, method="feature")
            s.rollback()
        assert len(sent) == 1  # a rolled-back job is never sent
    finally:
        outbox.register_sender(previous)


def test_the_lineage_layout_kept_from_the_last_job_is_the_one_the_database_holds(
    env: AppEnv,
) -> None:
    from sqlalchemy import delete, update

    from app.models import Lineage
    from app.pipeline import inputs as inputs_module

    first = _inputs(env, Recorder())

    def layout_now() -> tuple[np.ndarray, ...]:
        with session_scope() as s:
            return inputs_module._lineage_rows(s, first.model_id, first.ds.id)

    def fresh() -> tuple[np.ndarray, ...]:
        inputs_module._LAYOUTS.drop()
        return layout_now()

    def same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    assert inputs_module._LAYOUTS.get(first.model_id) is not None  # kept by `first`
    assert same(layout_now(), fresh())
    ids = [int(i) for i in first.ids[first.is_train][:4]]
    # Rows closed by a job (to_version set) leave the kept layout ...
    with session_scope() as s:
        s.execute(update(Lineage).where(Lineage.record_id.in_(ids[:2])).values(to_version=1))
    kept = layout_now()
    assert not set(ids[:2]) & set(kept[0].tolist()) and same(kept, fresh())
    # ... and rows deleted elsewhere (an erasure in another worker) are noticed by the
    # count of rows: the layout is read again, never served with rows that are gone.
    layout_now()
    with session_scope() as s:
        s.execute(delete(Lineage).where(Lineage.record_id.in_(ids[2:])))
    after = layout_now()
    assert not set(ids) & set(after[0].tolist()) and same(after, fresh())
