"""JobInputs: a job's inputs built once, every split a view of one conversion, a fanned
out shard reading only its rows, and a snapshot that rebuilds the same inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.datasets import service as datasets
from app.jobs import routing
from app.models import Job, MLModel
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
    retained, test, members = inputs.retained(), inputs.test(), inputs.members()
    assert len(reads) == 1 and inputs.phases.parquet_reads == 1
    assert np.array_equal(retained.record_ids, inputs.ids[inputs.retained_mask])
    assert np.array_equal(test.record_ids, inputs.test_ids)
    assert set(members.record_ids) <= set(retained.record_ids)
    # Every split lines up with the lineage layout it came from.
    assert len(retained) + len(test) == len(inputs.ids)
    assert "load" in inputs.phases.seconds


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
