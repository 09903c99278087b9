"""Feature forgetting on SISA MLPs in both modes, through the API and a real worker:
afterwards the production model is structurally blind to the feature, so changing it
changes no score at all."""

from __future__ import annotations

import httpx

from app.stack import LocalStack
from tests.integration.flows import erase, ingest, make_csv, train


def _blind_to_language(admin: httpx.Client, model: str) -> None:
    rows = [
        {"age": a, "score": s, "track": t, "home_language": lang}
        for a, s, t in ((15, -1.0, "a"), (17, 0.3, "b"), (18, 1.4, "a"))
        for lang in ("en", "es", "fr", "never-seen")
    ]
    r = admin.post(f"/v1/models/{model}/predict", json={"records": rows})
    assert r.status_code == 200, r.text
    scores = [p["score"] for p in r.json()["predictions"]]
    for i in range(0, len(scores), 4):
        assert len(set(scores[i : i + 4])) == 1, scores[i : i + 4]  # exact equality


def test_sisa_mlp_feature_removal_exact_and_approximate(stack: LocalStack) -> None:
    key = stack.create_key("admin", "ops")
    admin = httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    ds = ingest(admin, "langs", make_csv(n_subjects=120, per_subject=4, seed=9))
    for mode in ("exact", "approximate"):
        name = f"mlp-{mode}"
        train(
            admin,
            {
                "name": name,
                "dataset_id": ds["id"],
                "architecture": {"kind": "mlp", "hidden": [8]},
                "training": {"epochs": 3, "batch_size": 64, "lr": 0.02, "seed": 4},
                "unlearning": {"mode": "sisa", "shards": 2, "slices": 2, "feature_mode": mode},
                "verification": {"utility_max_drop": 0.1},
            },
        )
        done = erase(admin, {"kind": "feature", "model": name, "feature": "home_language"})
        assert done["status"] == "completed", done
        (m,) = done["models"]
        job = admin.get(f"/v1/jobs/{m['job_id']}").json()
        expected = "feature_retrain" if mode == "exact" else "feature_approximate"
        assert job["result"]["unlearning"]["method"] == expected, job["result"]
        if mode == "approximate":
            per_shard = job["result"]["unlearning"]["shards"]
            assert sorted(per_shard) == ["0", "1"]
            assert {s["method"] for s in per_shard.values()} == {"feature_repair"}
        model = admin.get(f"/v1/models/{name}").json()
        assert model["production_version"] == m["to_version"] == 2
        assert [f["feature"] for f in model["config"]["removed_features"]] == ["home_language"]
        _blind_to_language(admin, name)
        # The feature request leaves every record in place: a later erasure still works,
        # and the exact path retrains under the new feature spec.
    gone = erase(admin, {"kind": "subject", "subject_id": "p0003"})
    assert gone["status"] == "completed", gone
    for name in ("mlp-exact", "mlp-approximate"):
        _blind_to_language(admin, name)
