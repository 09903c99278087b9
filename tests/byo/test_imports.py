"""Models trained elsewhere: an upload that does not match is refused with a 422 saying
what differs; a matching one becomes version 1, is unlearned, verified and promoted."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from palimpsest_example_architectures import ResidualMLP
from safetensors.torch import save as st_save
from sqlalchemy import select

from app.core.db import session_scope
from app.models import Report
from app.pipeline import training
from tests.byo.flows import erase_subject
from tests.support.app_env import AppEnv
from tests.support.factories import (
    assert_error,
    auth,
    create_key,
    make_csv,
    make_rows,
    upload_dataset,
)

ROWS = make_rows(n_subjects=45, rows_per_subject=3, seed=11)
PREPROCESSING: dict[str, Any] = {
    "numeric": [
        {"column": "age", "mean": 50.0, "scale": 20.0},
        {"column": "score", "mean": 0.0, "scale": 1.0},
    ],
    "categorical": [
        {"column": "colour", "categories": ["red", "green", "blue"]},
        {"column": "region", "categories": ["1", "2", "3", "4"]},
    ],
}
ARCH = {"kind": "example-resmlp", "width": 6, "blocks": 1}
HELD_OUT = "registry"


def features(rows: list[dict[str, Any]]) -> torch.Tensor:
    """The external pipeline's own preprocessing (what PREPROCESSING describes)."""
    out = []
    for r in rows:
        x = [(float(r["age"]) - 50.0) / 20.0, float(r["score"])]
        x += [1.0 if r["colour"] == c else 0.0 for c in ("red", "green", "blue")]
        x += [1.0 if str(r["region"]) == c else 0.0 for c in ("1", "2", "3", "4")]
        out.append(x)
    return torch.tensor(out, dtype=torch.float32)


@pytest.fixture(scope="module")
def external() -> ResidualMLP:
    """A model trained outside Palimpsest on every source but the held-out one."""
    torch.manual_seed(0)
    model = ResidualMLP(9, 2, width=6, blocks=1)
    rows = [r for r in ROWS if r["source"] != HELD_OUT]
    x, y = features(rows), torch.tensor([float(r["label"] == "yes") for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y).backward()
        opt.step()
    return model.eval()


def weights_of(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> bytes:
    return bytes(st_save({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}))


def samples(model: torch.nn.Module, n: int = 6) -> list[dict[str, Any]]:
    rows = ROWS[:n]
    with torch.no_grad():
        p = torch.sigmoid(model(features(rows))[:, 0]).tolist()
    keep = ("age", "score", "colour", "region")
    return [
        {"record": {k: r[k] for k in keep}, "probabilities": [1 - q, q]}
        for r, q in zip(rows, p, strict=True)
    ]


@pytest.fixture(scope="module")
def admin(env: AppEnv) -> str:
    return create_key("admin")


@pytest.fixture(scope="module")
def dataset(env: AppEnv, admin: str) -> str:
    return str(upload_dataset(env.client, admin, "imported", make_csv(ROWS))["id"])


def spec(dataset: str, external: torch.nn.Module, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "external",
        "dataset_id": dataset,
        "architecture": ARCH,
        "preprocessing": PREPROCESSING,
        "held_out_sources": [HELD_OUT],
        "sample_predictions": samples(external),
        "training": {"epochs": 3, "batch_size": 32},
        "unlearning": {"strategy": "finetune"},
        "verification": {
            "utility_max_drop": 1.0,
            "forgetting_margin": 0.5,
            "reference_models": 2,
            # No attack power on such data: the owner accepts that (issue 13).
            "accept_inconclusive_forgetting": True,
        },
    }
    return body | over


def post(env: AppEnv, admin: str, body: dict[str, Any], weights: bytes) -> Any:
    return env.client.post(
        "/v1/model-imports",
        headers=auth(admin),
        files={"weights": ("model.safetensors", weights, "application/octet-stream")},
        data={"spec": json.dumps(body)},
    )


def _pickled(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_mismatched_uploads_are_refused(
    env: AppEnv, admin: str, dataset: str, external: ResidualMLP
) -> None:
    good = weights_of(external)
    narrow = ResidualMLP(9, 2, width=5, blocks=1)
    wrong_samples = samples(external)
    wrong_samples[2]["probabilities"] = [0.5 + 0.01, 0.5 - 0.01]
    other_prep = {
        **PREPROCESSING,
        "numeric": [{"column": "age", "mean": 40.0, "scale": 20.0}, PREPROCESSING["numeric"][1]],
    }
    cases: list[tuple[dict[str, Any], bytes, str, str]] = [
        (spec(dataset, external), _pickled(external), "invalid_weights", "not a safetensors"),
        (spec(dataset, external), b"\x00" * 64, "invalid_weights", "not a safetensors"),
        (spec(dataset, external), weights_of(narrow), "weights_mismatch", "input_layer.weight"),
        (
            spec(dataset, external, architecture={**ARCH, "blocks": 2}),
            good,
            "weights_mismatch",
            "blocks.1",
        ),
        (spec(dataset, external), weights_of(external, torch.float64), "weights_dtype", "float32"),
        (
            spec(dataset, external, sample_predictions=wrong_samples),
            good,
            "predictions_mismatch",
            "sample_predictions[2]",
        ),
        (
            spec(dataset, external, preprocessing=other_prep),
            good,
            "predictions_mismatch",
            "preprocessing",
        ),
        (
            spec(
                dataset,
                external,
                preprocessing={
                    **PREPROCESSING,
                    "numeric": [{"column": "height", "mean": 0, "scale": 1}],
                },
            ),
            good,
            "invalid_columns",
            "height",
        ),
        (
            spec(
                dataset,
                external,
                preprocessing={"numeric": [{"column": "colour", "mean": 0, "scale": 1}]},
            ),
            good,
            "invalid_preprocessing",
            "colour",
        ),
        (
            spec(dataset, external, architecture={"kind": "gbdt"}),
            good,
            "invalid_architecture",
            "PyTorch",
        ),
        (
            spec(dataset, external, architecture={"kind": "no-such-net"}),
            good,
            "architecture_plugin",
            "no-such-net",
        ),
        (spec(dataset, external, held_out_sources=["nowhere"]), good, "invalid_sources", "nowhere"),
        (
            spec(dataset, external, sample_predictions=[]),
            good,
            "invalid_spec",
            "sample_predictions",
        ),
    ]
    for body, blob, code, needle in cases:
        err = assert_error(post(env, admin, body, blob), 422, code)
        assert needle in err["message"], (code, err)
    assert_error(env.client.get("/v1/models/external", headers=auth(admin)), 404)


def test_an_imported_model_is_served_unlearned_verified_and_falls_back_to_retraining(
    env: AppEnv, admin: str, dataset: str, external: ResidualMLP
) -> None:
    resp = post(env, admin, spec(dataset, external), weights_of(external))
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["checks"]["max_abs_error"] <= 1e-4 and body["checks"]["dataset_sample_rows"] > 0
    training.run_training(body["job_id"])
    view = env.client.get("/v1/models/external", headers=auth(admin)).json()
    assert view["production_version"] == 1 and view["status"] == "ready", view
    # Served exactly as it was trained elsewhere: the same probabilities.
    records = [s["record"] for s in samples(external)]
    pred = env.client.post(
        "/v1/models/external/predict", headers=auth(admin), json={"records": records}
    )
    assert pred.status_code == 200, pred.text
    want = [s["probabilities"][1] for s in samples(external)]
    got = [p["score"] for p in pred.json()["predictions"]]
    assert np.allclose(got, want, atol=1e-5)

    # A subject the external model trained on (not from the held-out source).
    subject = next(r["subject"] for r in ROWS if r["source"] != HELD_OUT)
    done = erase_subject(env.client, admin, subject)
    assert done["status"] == "completed", done
    entry = done["models"][0]
    # Fine-tuning (the model's approximate method) made version 2; its forgetting check,
    # against references Palimpsest trained itself, still finds the forget set (seeds
    # from the model's name: the same verdict on every run), so the request fell back
    # to exact retraining, whose version 3 is served.
    assert entry["method"] == "retrain" and entry["to_version"] == 3, done
    report = env.client.get(f"/v1/reports/{entry['report_id']}", headers=auth(admin)).json()
    assert report["passed"] and {"utility", "forgetting"} <= set(report["checks"])
    with session_scope() as s:
        tuned = s.scalars(
            select(Report).where(Report.candidate_version == 2, Report.model_id == view["id"])
        ).one()
        checks = dict(tuned.checks)
    assert checks["forgetting"]["status"] == "fail", checks["forgetting"]
    assert "no out-reference" not in json.dumps(checks["forgetting"])
    after = env.client.get("/v1/models/external", headers=auth(admin)).json()
    assert after["production_version"] == 3
