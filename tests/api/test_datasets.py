"""`POST /v1/datasets`: accepted uploads (CSV, Parquet) and refused ones, which leave
nothing behind: no rows and no files under the artifact root."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from app.models import Dataset, Record, Source, Subject
from tests.support.app_env import AppEnv
from tests.support.factories import (
    assert_error,
    auth,
    dataset_spec,
    make_csv,
    make_parquet,
    make_rows,
    post_dataset,
    upload_dataset,
)

FIELDS = {"id", "name", "n_records", "n_subjects", "sources", "feature_columns", "group_columns"}


def check_accepted(body: dict[str, Any], rows: list[dict[str, Any]], name: str) -> None:
    assert set(body) >= FIELDS, body
    assert body["name"] == name
    assert body["n_records"] == len(rows)
    assert body["n_subjects"] == len({r["subject"] for r in rows})
    assert sorted(body["sources"]) == sorted({r["source"] for r in rows})
    # Every non-id, non-label column is a feature by default.
    assert sorted(body["feature_columns"]) == ["age", "colour", "region", "score"]
    assert body["group_columns"] == ["colour"]
    # Strings are categorical unless declared; `region` (integers) was declared.
    assert sorted(body["categorical_columns"]) == ["colour", "region"]
    assert body["label_column"] == "label"
    assert body["label_classes"] == ["no", "yes"]


def test_csv_ingest(env: AppEnv, keys: dict[str, str]) -> None:
    rows = make_rows(n_subjects=15, rows_per_subject=2, seed=1)
    body = upload_dataset(env.client, keys["admin"], "csv-ok", make_csv(rows))
    check_accepted(body, rows, "csv-ok")
    got = env.client.get(f"/v1/datasets/{body['id']}", headers=auth(keys["auditor"]))
    assert got.status_code == 200
    assert got.json() == body
    stored = [f for f in env.artifact_files() if f.startswith(f"datasets/{body['id']}/")]
    assert stored and all(f.endswith(".parquet") for f in stored)


def test_parquet_ingest(env: AppEnv, keys: dict[str, str]) -> None:
    rows = make_rows(n_subjects=12, rows_per_subject=3, seed=2, subject_prefix="pq")
    body = upload_dataset(
        env.client, keys["admin"], "parquet-ok", make_parquet(rows), filename="data.parquet"
    )
    check_accepted(body, rows, "parquet-ok")


def test_parquet_is_recognised_by_its_magic_bytes(env: AppEnv, keys: dict[str, str]) -> None:
    rows = make_rows(n_subjects=5, seed=3)
    body = upload_dataset(
        env.client, keys["admin"], "parquet-noext", make_parquet(rows), filename="upload.bin"
    )
    assert body["n_records"] == len(rows)


def test_unknown_dataset_is_404(env: AppEnv, keys: dict[str, str]) -> None:
    resp = env.client.get("/v1/datasets/nope", headers=auth(keys["admin"]))
    assert_error(resp, 404, "dataset_not_found")


# -- refused uploads --------------------------------------------------------------------


@pytest.fixture
def nothing_left(env: AppEnv) -> Iterator[None]:
    """Assert the test's refused upload left no rows and no files behind."""
    before = {m.__name__: env.count(m) for m in (Dataset, Record, Subject, Source)}
    files = env.artifact_files()
    yield
    after = {m.__name__: env.count(m) for m in (Dataset, Record, Subject, Source)}
    assert after == before
    assert env.artifact_files() == files


GOOD = make_csv(make_rows(n_subjects=6, seed=4, subject_prefix="bad"))
REFUSED: dict[str, tuple[bytes, Any, str, int, str]] = {
    # id: (file bytes, spec, filename, status, code)
    "spec is not JSON": (GOOD, "{name: 1", "d.csv", 422, "invalid_spec"),
    "spec is a list": (GOOD, "[1, 2]", "d.csv", 422, "invalid_spec"),
    "spec lacks name": (
        GOOD,
        {"subject_column": "subject", "label_column": "label"},
        "d.csv",
        422,
        "invalid_spec",
    ),
    "spec has an unknown key": (
        GOOD,
        dataset_spec("x", colour="red"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "bad dataset name": (GOOD, dataset_spec("../etc"), "d.csv", 422, "invalid_spec"),
    "unknown feature column": (
        GOOD,
        dataset_spec("x", feature_columns=["age", "nope"]),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "unknown categorical column": (
        GOOD,
        dataset_spec("x", categorical_columns=["nope"]),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "unknown group column": (
        GOOD,
        dataset_spec("x", group_columns=["nope"]),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "missing label column": (
        GOOD,
        dataset_spec("x", label_column="outcome"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "missing subject column": (
        GOOD,
        dataset_spec("x", subject_column="who"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "missing source column": (
        GOOD,
        dataset_spec("x", source_column="where"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "label is also a feature": (
        GOOD,
        dataset_spec("x", feature_columns=["label"]),
        "d.csv",
        422,
        "invalid_spec",
    ),
    # One column in two roles would store raw subject ids as labels, sources or groups.
    "label is the subject column": (
        GOOD,
        dataset_spec("x", label_column="subject"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "source is the subject column": (
        GOOD,
        dataset_spec("x", source_column="subject"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "group is the subject column": (
        GOOD,
        dataset_spec("x", group_columns=["subject"]),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "group is the label column": (
        GOOD,
        dataset_spec("x", group_columns=["label"]),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "source is the label column": (
        GOOD,
        dataset_spec("x", source_column="label"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "record ids are the subject column": (
        GOOD,
        dataset_spec("x", record_id_column="subject"),
        "d.csv",
        422,
        "invalid_spec",
    ),
    "deeply nested spec": (GOOD, "[" * 100_000 + "]" * 100_000, "d.csv", 422, "invalid_spec"),
    "empty file": (b"", dataset_spec("x"), "d.csv", 422, "invalid_file"),
    "header only": (
        b"subject,source,age,colour,region,label\n",
        dataset_spec("x"),
        "d.csv",
        422,
        "invalid_file",
    ),
    "garbage as parquet": (os.urandom(64), dataset_spec("x"), "d.parquet", 422, "invalid_file"),
    "truncated parquet": (
        b"PAR1" + os.urandom(40),
        dataset_spec("x"),
        "d.bin",
        422,
        "invalid_file",
    ),
    "ragged csv": (
        b"subject,label,age\ns1,yes\ns2,no,3,4\n",
        dataset_spec("x"),
        "d.csv",
        422,
        "invalid_file",
    ),
    "single-class label": (
        make_csv(make_rows(n_subjects=5, labels=("yes",))),
        dataset_spec("x"),
        "d.csv",
        422,
        "invalid_file",
    ),
    "blank subject": (
        b"subject,source,age,label\n s ,a,1,yes\n  ,a,2,no\n",
        dataset_spec("x", categorical_columns=None, group_columns=None),
        "d.csv",
        422,
        "invalid_file",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_upload_leaves_nothing(
    env: AppEnv, keys: dict[str, str], nothing_left: None, case: str
) -> None:
    data, spec, filename, status, code = REFUSED[case]
    resp = post_dataset(env.client, keys["admin"], data, spec, filename)
    assert_error(resp, status, code)


def test_missing_parts_are_422(env: AppEnv, keys: dict[str, str], nothing_left: None) -> None:
    h = auth(keys["admin"])
    assert_error(env.client.post("/v1/datasets", headers=h, data={"spec": "{}"}), 422)
    assert_error(env.client.post("/v1/datasets", headers=h, files={"file": ("d.csv", GOOD)}), 422)
    assert_error(env.client.post("/v1/datasets", headers=h, json={"spec": {}}), 422)


def test_role_conflict_names_both_roles(env: AppEnv, keys: dict[str, str]) -> None:
    resp = post_dataset(
        env.client, keys["admin"], GOOD, dataset_spec("x", group_columns=["subject"])
    )
    message = assert_error(resp, 422, "invalid_spec")["message"]
    assert "subject_column" in message and "group_columns" in message, message


def test_duplicate_name_is_409_and_leaves_nothing(env: AppEnv, keys: dict[str, str]) -> None:
    upload_dataset(env.client, keys["admin"], "dup", GOOD)
    before = (env.count(Dataset), env.count(Record), env.artifact_files())
    resp = post_dataset(env.client, keys["admin"], GOOD, dataset_spec("dup"))
    assert_error(resp, 409, "dataset_exists")
    assert (env.count(Dataset), env.count(Record), env.artifact_files()) == before


def test_spec_json_is_sent_as_a_string(env: AppEnv, keys: dict[str, str]) -> None:
    # A spec that is valid JSON but has wrong types must be a 422, not a crash.
    spec = json.dumps({**dataset_spec("typed"), "partitions": "many"})
    assert_error(post_dataset(env.client, keys["admin"], GOOD, spec), 422, "invalid_spec")
