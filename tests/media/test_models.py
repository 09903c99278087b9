"""`POST /v1/models` on media datasets: default encoders per column kind, resolved into
the stored architecture; overrides checked (422 for unknown parameters, values out of
range, columns that are not text/image/audio features, certified removal)."""

from __future__ import annotations

import pytest

from tests.media import gen
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, post_dataset


@pytest.fixture(scope="module")
def dataset_id(env: AppEnv) -> str:
    from tests.support.factories import create_key

    admin = create_key("admin", "media-models")
    recs = gen.rows("audio", n_subjects=6, seed=2)
    resp = post_dataset(
        env.client, admin, gen.zip_bytes(recs, "audio"), gen.spec("aud", "audio"), "a.zip"
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _create(env: AppEnv, admin: str, dataset_id: str, name: str, **body: object) -> object:
    return env.client.post(
        "/v1/models",
        headers=auth(admin),
        json={"name": name, "dataset_id": dataset_id, **body},
    )


def test_defaults_are_resolved_into_the_stored_architecture(
    env: AppEnv, keys: dict[str, str], dataset_id: str
) -> None:
    admin = keys["admin"]
    r = _create(env, admin, dataset_id, "aud-default", architecture={"kind": "mlp", "hidden": [4]})
    assert r.status_code == 202, r.text  # type: ignore[attr-defined]
    model = env.client.get("/v1/models/aud-default", headers=auth(admin)).json()
    enc = model["config"]["architecture"]["encoders"]
    assert enc == {
        "media": {
            "kind": "audio_cnn",
            "sample_rate": 8000,
            "seconds": 1.0,
            "n_mels": 32,
            "n_fft": 256,
            "hop": 128,
            "width": 8,
        }
    }


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"architecture": {"encoders": {"media": {"n_mels": 1}}}}, "n_mels"),
        ({"architecture": {"encoders": {"media": {"dim": 8}}}}, "no parameter 'dim'"),
        ({"architecture": {"encoders": {"media": {"kind": "text_bag"}}}}, "does not read"),
        ({"architecture": {"encoders": {"age": {"kind": "audio_cnn"}}}}, "not text, image"),
        ({"unlearning": {"certified": True}}, "media columns"),
    ],
)
def test_bad_encoder_overrides_are_422(
    env: AppEnv, keys: dict[str, str], dataset_id: str, body: dict[str, object], fragment: str
) -> None:
    r = _create(env, keys["admin"], dataset_id, "aud-bad", **body)
    err = assert_error(r, 422, "invalid_config")
    assert fragment in err["message"], err
