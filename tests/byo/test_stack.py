"""The issue's "done when", through real processes: `palimpsest api` and `palimpsest
worker` (embedded shape) with PALIMPSEST_MLFLOW_TRACKING_URI naming a real `mlflow
server`. A gbdt model and a plugin model are created over HTTP, a subject is erased, and
the new production version is Palimpsest's and MLflow's `production` alias, moved by the
worker's sync task."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import LocalStack
from tests.integration.flows import erase, make_csv, train, wait_for

pytestmark = pytest.mark.integration


def _alias(uri: str, name: str) -> int | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        mv = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, "production")
    except MlflowException:
        return None
    return int(mv.tags["palimpsest.version"])


def test_erasures_reach_mlflow_through_the_workers(tmp_path: Path, mlflow_uri: str) -> None:
    stack = LocalStack(
        tmp_path / "stack",
        env={"PALIMPSEST_DEVICE": "cpu", "PALIMPSEST_MLFLOW_TRACKING_URI": mlflow_uri},
    )
    stack.start()
    try:
        key = stack.create_key("admin", "byo")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
            spec = {
                "name": "people",
                "subject_column": "person",
                "label_column": "passed",
                "source_column": "district",
            }
            r = client.post(
                "/v1/datasets",
                files={"file": ("p.csv", io.BytesIO(make_csv(n_subjects=60, per_subject=3)))},
                data={"spec": json.dumps(spec)},
            )
            assert r.status_code == 201, r.text
            common: dict[str, Any] = {
                "dataset_id": r.json()["id"],
                "training": {"epochs": 2, "batch_size": 32},
                "verification": {"utility_max_drop": 1.0},
            }
            arches = {
                "stack-gbdt": {"kind": "gbdt", "max_iter": 10},
                "stack-plugin": {"kind": "example-resmlp", "width": 8, "blocks": 1},
            }
            for name, arch in arches.items():
                train(
                    client,
                    {**common, "name": name, "architecture": arch, "unlearning": {"shards": 2}},
                )
            for name in arches:
                wait_for(lambda n=name: _alias(mlflow_uri, n), lambda v: v == 1, timeout=120)
            done = erase(client, {"kind": "subject", "subject_id": "p0007"})
            assert done["status"] == "completed", done
            for m in done["models"]:
                assert m["method"] == "sisa" and m["to_version"] == 2, done
            for name in arches:
                view = client.get(f"/v1/models/{name}").json()
                assert view["production_version"] == 2
                wait_for(lambda n=name: _alias(mlflow_uri, n), lambda v: v == 2, timeout=120)
    finally:
        stack.stop()
