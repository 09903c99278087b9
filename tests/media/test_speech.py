"""The ESL story's speech, synthesised offline by espeak-ng (a Debian package that
`.ci/run` installs): its streamed WAVs ingest from a zip and train an audio model."""

from __future__ import annotations

import pytest

from app.demo_media import esl_speech_rows, espeak_available, speech_zip
from tests.media.test_flow import SMALL
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_model, post_dataset

pytestmark = pytest.mark.skipif(
    not espeak_available(),
    reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)",
)


def test_synthesised_answers_ingest_and_train(env: AppEnv, keys: dict[str, str]) -> None:
    admin = keys["admin"]
    rows = esl_speech_rows(n_students=12)
    assert all(r["wav"][:4] == b"RIFF" for r in rows)
    # A student repeating a word gives the same recording; students differ.
    assert len({r["wav"] for r in rows}) > len(rows) // 2
    spec = {
        "name": "esl-speech-test",
        "subject_column": "student",
        "label_column": "said_yes",
        "source_column": "district",
        "audio_columns": ["answer"],
        "group_columns": ["home_language"],
        "feature_columns": ["answer"],
    }
    resp = post_dataset(env.client, admin, speech_zip(rows), spec, "answers.zip")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["column_kinds"] == {"answer": "audio"}
    assert ds["n_records"] == len(rows)
    create_model(
        env.client,
        admin,
        ds["id"],
        name="esl-speech-test",
        architecture={"kind": "mlp", "hidden": [8], "encoders": {"answer": SMALL["audio"]}},
        unlearning={"mode": "sisa", "shards": 2, "slices": 2, "sharding": "source"},
    )
    model = env.client.get("/v1/models/esl-speech-test", headers=auth(admin)).json()
    assert model["production_version"] == 1, model
