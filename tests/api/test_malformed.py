"""Property-style: many malformed bodies, never a 500, always the error shape.

No hypothesis here; a fixed list of hostile payloads plus seeded random JSON values and
random mutations of valid bodies.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tests.support.app_env import AppEnv
from tests.support.factories import auth, make_csv, make_rows, upload_dataset

HOSTILE: list[Any] = [
    None,
    [],
    {},
    "subject",
    0,
    -1,
    1.5,
    True,
    [{"kind": "subject"}],
    {"kind": None},
    {"kind": 1},
    {"kind": ["subject"]},
    {"kind": {"$ne": None}},
    {"kind": "subject", "subject_id": 12345},
    {"kind": "subject", "subject_id": ["a"]},
    {"kind": "subject", "subject_id": {"a": 1}},
    {"kind": "subject", "subject_id": "\u0000"},
    {"kind": "subject", "subject_id": "x" * 10_000},
    {"kind": "subject", "subject_id": "' OR 1=1 --"},
    {"kind": "subject", "subject_id": "\U0001f600" * 50},
    {"kind": "records", "record_ids": [1, 2, 3]},
    {"kind": "records", "record_ids": [None]},
    {"kind": "records", "record_ids": "0"},
    {"kind": "records", "record_ids": ["0"], "dataset_id": "x" * 100},
    {"kind": "records", "record_ids": ["0"] * 1000},
    {"kind": "source", "source": ""},
    {"kind": "source", "source": "s" * 500},
    {"kind": "feature", "feature": "age"},
    {"kind": "feature", "feature": "age", "model": "no-such-model"},
    {"kind": "subject", "subject_id": "m-0001", "reason": "r" * 5000},
    {"kind": "subject", "subject_id": "m-0001", "unexpected": True},
    {"name": "x", "dataset_id": "y"},
    {"name": "", "dataset_id": ""},
    {"name": "n" * 300, "dataset_id": "d"},
    {"name": "ok", "dataset_id": None},
    {"name": "ok", "dataset_id": 7},
    {"name": "ok", "dataset_id": "d", "architecture": {"kind": "mlp", "hidden": [10**30]}},
    {"name": "ok", "dataset_id": "d", "architecture": {"kind": "mlp", "hidden": ["8"]}},
    {"name": "ok", "dataset_id": "d", "architecture": {"kind": "mlp", "hidden": [-1]}},
    {"name": "ok", "dataset_id": "d", "training": {"lr": "fast"}},
    {"name": "ok", "dataset_id": "d", "training": {"seed": 2**80}},
    {"name": "ok", "dataset_id": "d", "unlearning": {"shards": 0}},
    {"name": "ok", "dataset_id": "d", "unlearning": {"mode": "magic"}},
    {"name": "ok", "dataset_id": "d", "test_fraction": None},
]

RAW: list[bytes] = [
    b"",
    b"{",
    b"not json",
    b"\xff\xfe\x00",
    b'{"kind": NaN}',
    b'{"kind": "subject", "subject_id": Infinity}',
    b"[" * 2000 + b"]" * 2000,
    b'{"kind": "subject", "subject_id": "a", "kind": "source"}',
    # A lone surrogate is legal JSON escape syntax but not encodable text.
    b'{"kind": "subject", "subject_id": "\\ud800"}',
    b'{"kind": "source", "source": "\\udfff"}',
    b'{"name": "\\ud800", "dataset_id": "d"}',
    json.dumps({"name": "nan", "dataset_id": "d", "training": {"lr": float("nan")}}).encode(),
    json.dumps({"name": "nan", "dataset_id": "d", "test_fraction": float("inf")}).encode(),
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.randint(-(2**70), 2**70)
    if choice == 3:
        return rng.uniform(-1e9, 1e9)
    if choice == 4:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
    if choice == 5:
        return rng.choice(["subject", "records", "source", "feature", "mlp", "logreg", "", "0"])
    if choice == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = [
        "kind",
        "subject_id",
        "record_ids",
        "source",
        "name",
        "dataset_id",
        "architecture",
        "training",
        "unlearning",
        "hidden",
        "epochs",
        "model",
        "feature",
        "x",
    ]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def mutations(valid: dict[str, Any], seed: int, n: int) -> list[Any]:
    """Valid bodies with one field replaced by a random value, or one nested field."""
    rng = random.Random(seed)
    out: list[Any] = []
    for _ in range(n):
        body = json.loads(json.dumps(valid))
        field = rng.choice([*body, "extra"])
        body[field] = random_json(rng)
        out.append(body)
        out.append(random_json(rng))
    return out


@pytest.fixture(scope="module")
def dataset(env: AppEnv, keys: dict[str, str]) -> dict[str, Any]:
    rows = make_rows(n_subjects=8, seed=31, subject_prefix="m")
    return upload_dataset(env.client, keys["admin"], "malformed-ds", make_csv(rows))


def check(resp: Any, payload: Any) -> None:
    assert resp.status_code < 500, (payload, resp.status_code, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str), resp.text


@pytest.mark.parametrize("role", ["portal", "admin"])
def test_deletion_requests_never_500(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any], role: str
) -> None:
    url, h = "/v1/deletion-requests", auth(keys[role])
    valid = {"kind": "subject", "subject_id": "m-0001", "reason": "gdpr"}
    for payload in HOSTILE + mutations(valid, seed=1, n=40):
        check(env.client.post(url, headers=h, json=payload), payload)
    for raw in RAW:
        check(
            env.client.post(url, headers={**h, "content-type": "application/json"}, content=raw),
            raw,
        )
    check(env.client.post(url, headers={**h, "content-type": "text/plain"}, content=b"{}"), "txt")


def test_models_never_500(env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]) -> None:
    url, h = "/v1/models", auth(keys["admin"])
    valid = {
        "name": "fuzzed",
        "dataset_id": dataset["id"],
        "architecture": {"kind": "logreg"},
        "training": {"epochs": 1},
        "unlearning": {"mode": "sisa", "shards": 2, "slices": 1},
    }
    hostile = [
        {**p, "dataset_id": dataset["id"]} if isinstance(p, dict) and "dataset_id" in p else p
        for p in HOSTILE
    ]
    nested = []
    rng = random.Random(2)
    for _ in range(30):
        body = json.loads(json.dumps(valid))
        section = rng.choice(["architecture", "training", "unlearning"])
        body["name"] = f"fuzzed-{len(nested)}"
        body[section][rng.choice(["kind", "hidden", "epochs", "lr", "shards", "mode", "x"])] = (
            random_json(rng)
        )
        nested.append(body)
    for payload in hostile + mutations(valid, seed=3, n=40) + nested:
        check(env.client.post(url, headers=h, json=payload), payload)
    for raw in RAW:
        check(
            env.client.post(url, headers={**h, "content-type": "application/json"}, content=raw),
            raw,
        )


def test_deeply_nested_bodies_are_4xx(
    env: AppEnv, keys: dict[str, str], dataset: dict[str, Any]
) -> None:
    """Nesting deeper than the parsers recurse (RecursionError) is bad input, not a bug."""
    h = {**auth(keys["admin"]), "content-type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    params = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
    model = (
        b'{"name": "deep", "dataset_id": "%s", "unlearning": {"mode": "monolithic",'
        b' "strategy_params": %s}}' % (dataset["id"].encode(), params)
    )
    for url, raw in (
        ("/v1/deletion-requests", deep),
        ("/v1/models", deep),
        ("/v1/models", model),
        ("/v1/webhooks", deep),
    ):
        resp = env.client.post(url, headers=h, content=raw)
        assert 400 <= resp.status_code < 500, (url, resp.status_code, resp.text[:200])
        check(resp, url)


@pytest.mark.parametrize("version", ["9223372036854775808", str(2**64), "0", "-1", str(2**31)])
def test_promote_of_a_version_out_of_range_is_422(
    env: AppEnv, keys: dict[str, str], version: str
) -> None:
    resp = env.client.post(
        f"/v1/models/any/versions/{version}/promote", headers=auth(keys["admin"])
    )
    assert resp.status_code == 422, resp.text
    check(resp, version)
