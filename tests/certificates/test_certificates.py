"""Certificates: Ed25519 over canonical JSON, issued per completed request, verifiable
offline; any changed byte or a different key fails."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from typer.testing import CliRunner

from app.cli import cli
from app.core import signing
from app.core.security import subject_key
from app.core.settings import DEV_PEPPER
from tests.support.app_env import AppEnv, clear_caches
from tests.support.factories import assert_error, auth

runner = CliRunner()


def _doc() -> dict[str, Any]:
    return {
        "format": "palimpsest.certificate/v1",
        "request": {"id": "a1b2c3", "kind": "subject", "completed_at": "2026-01-02T03:04:05"},
        "subject": {"subject_key": "f" * 64},
        "models": [
            {
                "model": "pass-predictor",
                "from_version": 1,
                "to_version": 2,
                "method": "certified",
                "certified": {"epsilon": 1.0, "delta": 1e-05, "budget_left": 0.25},
                "artifacts": {"manifest": {"sha256": "ab" * 32}},
            }
        ],
        "erasure": {"records_erased": 5, "parquet_rows_removed": 5},
        "note": "Zoë — 東京",
        "issued_at": "2026-01-02T03:04:06",
    }


# -- signing ------------------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_utf8_and_refuses_nan() -> None:
    assert signing.canonical_json({"b": 1, "a": ["é", 2.5]}) == '{"a":["é",2.5],"b":1}'.encode()
    with pytest.raises(ValueError):
        signing.canonical_json({"x": float("nan")})


def test_valid_certificate_verifies_and_survives_a_json_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    signed = signing.sign(_doc(), key)
    assert signed["signature"]["algorithm"] == "Ed25519"
    assert signed["signature"]["key_id"] == signing.key_id(key)
    assert len(signing.key_id(key)) == 16
    # What a client gets over HTTP: pretty-printed, keys in any order.
    again = json.loads(json.dumps(signed, indent=2, ensure_ascii=True))
    assert signing.verify(again, key.public_key())
    assert signing.check(again, key.public_key()) is None


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("request", "id"), "a1b2c4"),
        (("request", "kind"), "source"),
        (("subject", "subject_key"), "f" * 63 + "e"),
        (("models", 0, "to_version"), 3),
        (("models", 0, "certified", "epsilon"), 1.0000001),
        (("models", 0, "artifacts", "manifest", "sha256"), "ab" * 31 + "ac"),
        (("erasure", "records_erased"), 4),
        (("note",), "Zoe — 東京"),
        (("issued_at",), "2026-01-02T03:04:07"),
    ],
)
def test_a_changed_field_fails(path: tuple[Any, ...], value: Any) -> None:
    key = Ed25519PrivateKey.generate()
    signed = signing.sign(_doc(), key)
    tampered = copy.deepcopy(signed)
    node = tampered["certificate"]
    for p in path[:-1]:
        node = node[p]
    assert node[path[-1]] != value
    node[path[-1]] = value
    assert not signing.verify(tampered, key.public_key())
    assert "does not match" in str(signing.check(tampered, key.public_key()))


def test_added_or_removed_field_fails() -> None:
    key = Ed25519PrivateKey.generate()
    signed = signing.sign(_doc(), key)
    added = copy.deepcopy(signed)
    added["certificate"]["extra"] = None
    removed = copy.deepcopy(signed)
    del removed["certificate"]["note"]
    for bad in (added, removed):
        assert not signing.verify(bad, key.public_key())


def test_every_single_byte_change_of_the_certificate_is_refused() -> None:
    """Flip each byte of the canonical certificate in turn: the result either is no longer
    JSON (UTF-8) at all, or it parses and its signature fails."""
    key = Ed25519PrivateKey.generate()
    signed = signing.sign(_doc(), key)
    sig = signed["signature"]
    blob = bytearray(signing.canonical_json(signed["certificate"]))
    parsed_and_refused = 0
    for i in range(len(blob)):
        mutated = bytearray(blob)
        mutated[i] ^= 0x01
        try:
            doc = json.loads(bytes(mutated).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        assert not signing.verify({"certificate": doc, "signature": sig}, key.public_key()), i
        parsed_and_refused += 1
    assert parsed_and_refused > len(blob) // 2  # most flips still parse: the signature caught them


def test_a_changed_signature_fails() -> None:
    key = Ed25519PrivateKey.generate()
    signed = signing.sign(_doc(), key)
    raw = bytearray(base64.b64decode(signed["signature"]["value"]))
    raw[10] ^= 0x80
    signed["signature"]["value"] = base64.b64encode(bytes(raw)).decode()
    assert "does not match" in str(signing.check(signed, key.public_key()))
    signed["signature"]["value"] = "not base64!"
    assert not signing.verify(signed, key.public_key())


def test_wrong_key_fails_even_when_relabelled() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = signing.sign(_doc(), key)
    assert "not by this key" in str(signing.check(signed, other.public_key()))
    # Claiming the other key's id does not help: the signature is still the first key's.
    relabelled = copy.deepcopy(signed)
    relabelled["signature"]["key_id"] = signing.key_id(other)
    assert "does not match" in str(signing.check(relabelled, other.public_key()))
    assert not signing.verify(relabelled, key.public_key())  # and the real key's id is gone


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"certificate": {}},
        {"certificate": [], "signature": {}},
        {"certificate": {}, "signature": {"algorithm": "RSA", "key_id": "x", "value": ""}},
    ],
)
def test_malformed_documents_are_refused(bad: Any) -> None:
    key = Ed25519PrivateKey.generate()
    assert not signing.verify(bad, key.public_key())


def test_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "signing-key.pem"
    first = signing.load_or_create_key(path)
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    blob = path.read_bytes()
    second = signing.load_or_create_key(path)
    assert signing.key_id(second) == signing.key_id(first)
    assert path.read_bytes() == blob
    assert signing.key_id(signing.load_public_key(path)) == signing.key_id(first)
    pub = tmp_path / "pub.pem"
    pub.write_text(signing.public_pem(first))
    assert signing.key_id(signing.load_public_key(pub)) == signing.key_id(first)
    assert [p.name for p in path.parent.iterdir()] == ["signing-key.pem"]  # no temp left


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "race" / "signing-key.pem"
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        ids.append(signing.key_id(signing.load_or_create_key(path)))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert ids[0] == signing.key_id(signing.load_or_create_key(path))
    assert os.listdir(path.parent) == ["signing-key.pem"]


# -- the command --------------------------------------------------------------------------


@pytest.fixture
def signed_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    key = Ed25519PrivateKey.generate()
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(signing.sign(_doc(), key), indent=2, ensure_ascii=False))
    pub = tmp_path / "pub.pem"
    pub.write_text(signing.public_pem(key))
    other = tmp_path / "other.pem"
    other.write_text(signing.public_pem(Ed25519PrivateKey.generate()))
    return cert, pub, other


def test_cli_valid_is_exit_0(signed_files: tuple[Path, Path, Path]) -> None:
    cert, pub, _ = signed_files
    result = runner.invoke(cli, ["verify-certificate", str(cert), "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "valid"


def test_cli_tampered_or_wrong_key_is_exit_1(signed_files: tuple[Path, Path, Path]) -> None:
    cert, pub, other = signed_files
    wrong = runner.invoke(cli, ["verify-certificate", str(cert), "--public-key", str(other)])
    assert wrong.exit_code == 1 and "not by this key" in wrong.output
    assert "valid" not in wrong.stdout
    cert.write_text(cert.read_text().replace('"to_version": 2', '"to_version": 3'))
    tampered = runner.invoke(cli, ["verify-certificate", str(cert), "--public-key", str(pub)])
    assert tampered.exit_code == 1 and "does not match" in tampered.output
    garbage_key = cert.parent / "garbage.pem"
    garbage_key.write_text("not a key")
    bad_key = runner.invoke(
        cli, ["verify-certificate", str(cert), "--public-key", str(garbage_key)]
    )
    assert bad_key.exit_code == 1 and "cannot load a public key" in bad_key.output


def test_cli_not_json_is_exit_2(tmp_path: Path, signed_files: tuple[Path, Path, Path]) -> None:
    _, pub, _ = signed_files
    for content in (b"this is not json", b"\xff\xfe\x00garbage", b""):
        f = tmp_path / "junk.json"
        f.write_bytes(content)
        result = runner.invoke(cli, ["verify-certificate", str(f), "--public-key", str(pub)])
        assert result.exit_code == 2, (content, result.output)
        assert "not a JSON document" in result.output
    missing = runner.invoke(cli, ["verify-certificate", str(tmp_path / "absent.json")])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_cli_defaults_to_the_configured_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "keys" / "signing-key.pem"
    monkeypatch.setenv("PALIMPSEST_SIGNING_KEY_FILE", str(key_file))
    clear_caches()
    try:
        cert = tmp_path / "cert.json"
        cert.write_text(json.dumps({"x": 1}))
        no_key = runner.invoke(cli, ["verify-certificate", str(cert)])
        assert no_key.exit_code == 1 and not key_file.exists()  # never invents a key
        key = signing.load_or_create_key(key_file)
        cert.write_text(json.dumps(signing.sign(_doc(), key)))
        result = runner.invoke(cli, ["verify-certificate", str(cert)])
        assert result.exit_code == 0 and result.stdout.strip() == "valid", result.output
    finally:
        clear_caches()


# -- issued by the service, served by the API ---------------------------------------------


def _seed_completed_request(env: AppEnv, portal_name: str, status: str = "erasing") -> str:
    """A request on a model whose v2 came from a certified removal, with real artifacts;
    returns the request id. Rows are written directly: no worker runs here."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.core.storage import get_store
    from app.models import (
        ApiKey,
        Dataset,
        DeletionRequest,
        Job,
        MLModel,
        ModelVersion,
        Report,
        RequestModel,
    )
    from app.models.base import new_id, utcnow
    from app.registry import artifacts

    store = get_store()
    with session_scope() as s:
        portal = s.scalars(select(ApiKey).where(ApiKey.name == portal_name)).one()
        ds = Dataset(
            name=f"ds-{new_id()[:8]}", spec={}, schema={}, n_partitions=1, artifact_prefix="x"
        )
        s.add(ds)
        s.flush()
        model = MLModel(
            name=f"m-{new_id()[:8]}",
            dataset_id=ds.id,
            config={"unlearning": {"mode": "monolithic", "certified": True}},
            status="ready",
            production_version=2,
        )
        s.add(model)
        s.flush()
        ckpt = artifacts.checkpoint_store(store, model.id)
        ckpt.save("cert-state-k2", {"w": torch.arange(4.0)}, {"certified": True})
        ckpt.save("mono-k2", {"w": torch.ones(3)}, {"job": "j"})
        rel = artifacts.manifest_path(model.id, 2)
        store.write_bytes(rel, b'{"entries": "the manifest bytes"}')
        entry = {"shard": 0, "final_key": "mono-k2", "checkpoint_keys": ["cert-state-k2"]}
        s.add(
            ModelVersion(
                model_id=model.id,
                version=2,
                status="production",
                manifest={"entries": [entry]},
                manifest_path=rel,
            )
        )
        job = Job(
            kind="unlearn",
            model_id=model.id,
            method="certified",
            status="succeeded",
            result={
                "unlearning": {
                    "method": "certified",
                    "approximate": True,
                    "epsilon": 1.0,
                    "delta": 1e-05,
                    "bound": 0.0123,
                    "cumulative_bound": 0.02,
                    "budget": 0.1,
                    "budget_left": 0.08,
                }
            },
            cost={"wall_seconds": 1.5, "device": "cpu", "retrain_estimate_seconds": 30.0},
        )
        s.add(job)
        s.flush()
        report = Report(
            model_id=model.id,
            job_id=job.id,
            candidate_version=2,
            baseline_version=1,
            passed=True,
            decision="promote",
            checks={"utility": {"passed": True, "metrics": {}}, "lineage": {"passed": True}},
        )
        s.add(report)
        now = utcnow()
        req = DeletionRequest(
            kind="subject",
            status=status,
            subject_key=subject_key("person-42", DEV_PEPPER),
            reason="Art. 17",
            external_ref="ticket-9",
            api_key_id=portal.id,
            received_at=now,
            due_at=now + timedelta(days=30),
            n_records=5,
        )
        s.add(req)
        s.flush()
        s.add(
            RequestModel(
                request_id=req.id,
                model_id=model.id,
                status="promoted",
                job_id=job.id,
                from_version=1,
                to_version=2,
                method="certified",
                report_id=report.id,
            )
        )
        return str(req.id)


def _complete(rid: str, erasure: dict[str, Any]) -> None:
    from app.certificates import service as certificates
    from app.core.db import session_scope
    from app.core.storage import get_store
    from app.models import DeletionRequest
    from app.requests.service import transition

    with session_scope() as s:
        req = s.get(DeletionRequest, rid)
        assert req is not None
        transition(s, req, "completed", "worker")
        certificates.issue(s, get_store(), req, erasure)


def test_certificate_is_issued_signed_and_served(env: AppEnv, keys: dict[str, str]) -> None:
    rid = _seed_completed_request(env, "portal-a")
    # Not completed yet: a clear 404 with its own code, for every role that may read it.
    for role in ("portal", "admin", "auditor"):
        resp = env.client.get(f"/v1/deletion-requests/{rid}/certificate", headers=auth(keys[role]))
        assert_error(resp, 404, "certificate_not_available")
    erasure = {"records": 5, "parquet_rows": 5, "versions_purged": {"m": [1]}}
    _complete(rid, erasure)

    key_info = env.client.get("/v1/signing-key").json()  # public: no key needed
    assert key_info["algorithm"] == "Ed25519"
    key_file = env.folder / "keys" / "signing-key.pem"
    assert key_info["key_id"] == signing.key_id(signing.load_public_key(key_file))

    resp = env.client.get(f"/v1/deletion-requests/{rid}/certificate", headers=auth(keys["portal"]))
    assert resp.status_code == 200, resp.text
    signed = resp.json()
    pub = load_pem_public_key(key_info["public_key_pem"].encode())
    assert isinstance(pub, Ed25519PublicKey)
    assert signing.verify(signed, pub)

    cert = signed["certificate"]
    assert cert["request"]["id"] == rid and cert["request"]["kind"] == "subject"
    assert cert["request"]["reason"] == "Art. 17" and cert["request"]["external_ref"] == "ticket-9"
    assert cert["request"]["completed_at"] and cert["request"]["received_at"]
    assert cert["request"]["due_at"] and cert["issued_at"]
    assert cert["subject"] == {"subject_key": subject_key("person-42", DEV_PEPPER)}
    assert "person-42" not in json.dumps(signed)  # never the raw subject id
    assert cert["issuer"]["key_id"] == key_info["key_id"] == signed["signature"]["key_id"]
    assert cert["erasure"] == {
        "data_held": True,
        "statement": "the request's data was erased from every model and store that held it",
        "records_erased": 5,
        "parquet_rows_removed": 5,
        "versions_purged": {"m": [1]},
    }
    (m,) = cert["models"]
    assert (m["from_version"], m["to_version"], m["method"]) == (1, 2, "certified")
    assert m["exactness"] == "approximate" and "certified" in m["guarantee"]
    assert m["certified"]["epsilon"] == 1.0 and m["certified"]["delta"] == 1e-05
    assert m["certified"]["bound"] == 0.0123 and m["certified"]["budget_left"] == 0.08
    assert m["report"]["passed"] is True and m["report"]["decision"] == "promote"
    assert m["report"]["checks"] == {"lineage": True, "utility": True}
    assert m["cost"]["retrain_estimate_seconds"] == 30.0
    # Artifact hashes are those of the files on disk.
    art = m["artifacts"]
    manifest_file = env.artifact_root / art["manifest"]["path"]
    assert art["manifest"]["sha256"] == hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    (shard,) = art["shards"]
    assert shard["final_key"] == "mono-k2" and set(shard["checkpoints"]) == {
        "cert-state-k2",
        "mono-k2",
    }
    ckpt_dir = env.artifact_root / "models" / m["model_id"] / "checkpoints"
    for k, digest in shard["checkpoints"].items():
        weights = (ckpt_dir / f"{k}.safetensors").read_bytes()
        assert digest == hashlib.sha256(weights).hexdigest()

    # Readers: admin and auditor too; another portal sees no such request.
    for role in ("admin", "auditor"):
        got = env.client.get(f"/v1/deletion-requests/{rid}/certificate", headers=auth(keys[role]))
        assert got.status_code == 200 and got.json() == signed
    other = env.client.get(
        f"/v1/deletion-requests/{rid}/certificate", headers=auth(keys["portal_b"])
    )
    assert_error(other, 404, "request_not_found")

    # Offline check with the downloaded files, as an outsider would.
    cert_file = env.folder / "downloaded.json"
    cert_file.write_text(resp.text)
    pem_file = env.folder / "published.pem"
    pem_file.write_text(key_info["public_key_pem"])
    ok = runner.invoke(cli, ["verify-certificate", str(cert_file), "--public-key", str(pem_file)])
    assert ok.exit_code == 0 and ok.stdout.strip() == "valid", ok.output
    by_default = runner.invoke(cli, ["verify-certificate", str(cert_file)])  # settings' key
    assert by_default.exit_code == 0, by_default.output


def test_issuing_twice_keeps_the_first(env: AppEnv, keys: dict[str, str]) -> None:
    from app.certificates import service as certificates
    from app.core.db import session_scope
    from app.core.storage import get_store
    from app.models import Certificate, DeletionRequest

    rid = _seed_completed_request(env, "portal-a")
    _complete(rid, {"records": 5, "parquet_rows": 5, "versions_purged": {}})
    first = env.client.get(
        f"/v1/deletion-requests/{rid}/certificate", headers=auth(keys["admin"])
    ).json()
    with session_scope() as s:
        req = s.get(DeletionRequest, rid)
        assert req is not None
        again = certificates.issue(
            s, get_store(), req, {"records": 99}, key=Ed25519PrivateKey.generate()
        )
        assert again.body == first
    assert env.count(Certificate) >= 1
    audit = env.client.get("/v1/audit?limit=500", headers=auth(keys["auditor"])).json()["items"]
    issued = [e for e in audit if e["action"] == "certificate.issued" and e["entity_id"] == rid]
    assert len(issued) == 1
    digest = hashlib.sha256(signing.canonical_json(first["certificate"])).hexdigest()
    assert issued[0]["data"]["sha256"] == digest


@pytest.mark.parametrize(
    ("method", "result", "exactness", "guarantee"),
    [
        ("sisa", {"method": "sisa", "approximate": False}, "exact", "exact: no retained"),
        ("retrain", {"method": "retrain", "approximate": False}, "exact", "exact: no retained"),
        ("feature_retrain", {"method": "feature_retrain"}, "exact", "exact: no retained"),
        ("gradient_ascent", {"approximate": True}, "approximate", "verified empirically"),
        ("feature_linear", {"method": "feature_linear"}, "approximate", "verified empirically"),
        ("certified", {"approximate": True, "epsilon": 2.0}, "approximate", "certified"),
    ],
)
def test_guarantee_per_method(
    method: str, result: dict[str, Any], exactness: str, guarantee: str
) -> None:
    from app.certificates.service import _guarantee

    g = _guarantee(method, result)
    assert g["exactness"] == exactness and guarantee in g["guarantee"]
    assert ("certified" in g) == (method == "certified")
