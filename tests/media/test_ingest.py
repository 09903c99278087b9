"""`POST /v1/datasets` with text, image and audio: zip archives (manifest and files) and
Parquet with the files' bytes; `column_kinds`; media stored content-addressed per
partition; bad archives refused (422 naming the file) with nothing left behind."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from app.models import Dataset, Record, Source, Subject
from tests.media import gen
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth, post_dataset


def _accepted(env: AppEnv, admin: str, data: bytes, spec: dict, filename: str) -> dict:
    resp = post_dataset(env.client, admin, data, spec, filename)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    kind = next(
        k.removesuffix("_columns") for k in spec if k.endswith("_columns") and k != "group_columns"
    )
    assert body["column_kinds"] == {"group": "categorical", "age": "numeric", "media": kind}
    assert body["n_records"] == 32 and body["n_subjects"] == 16
    got = env.client.get(f"/v1/datasets/{body['id']}", headers=auth(admin)).json()
    assert got["column_kinds"] == body["column_kinds"]
    return body


def _media_files(env: AppEnv, ds_id: str) -> set[str]:
    return {f for f in env.artifact_files() if f.startswith(f"datasets/{ds_id}/media/")}


@pytest.mark.parametrize("kind", ["text", "image", "audio"])
@pytest.mark.parametrize("form", ["zip-csv", "zip-parquet", "parquet"])
def test_media_ingest(env: AppEnv, keys: dict[str, str], kind: str, form: str) -> None:
    recs = gen.rows(kind, n_subjects=16, seed=1)
    name = f"{kind}-{form}"
    if form == "parquet":
        data, filename = gen.parquet_bytes(recs), "d.parquet"
    else:
        data, filename = gen.zip_bytes(recs, kind, manifest=form.removeprefix("zip-")), "d.zip"
    body = _accepted(env, keys["admin"], data, gen.spec(name, kind), filename)
    stored = _media_files(env, body["id"])
    if kind == "text":
        assert not stored  # text lives in the Parquet partitions
    else:
        # One file per distinct content per partition, under its SHA-256.
        import hashlib

        digests = {p.rsplit("/", 1)[1] for p in stored}
        assert digests == {hashlib.sha256(r["media"]).hexdigest() for r in recs}
        one = next(iter(stored))
        assert (env.artifact_root / one).read_bytes() in {r["media"] for r in recs}


def test_text_may_come_from_txt_files_in_the_archive(env: AppEnv, keys: dict[str, str]) -> None:
    recs = gen.rows("text", n_subjects=16, seed=2)
    extra = {f"cv/{i}.txt": r["media"].encode() for i, r in enumerate(recs)}
    for i, r in enumerate(recs):
        r["media"] = f"cv/{i}.txt"
    data = gen.zip_bytes(recs, "text", extra=extra)
    _accepted(env, keys["admin"], data, gen.spec("text-files", "text"), "cvs.zip")


# -- refused archives --------------------------------------------------------------------


@pytest.fixture
def nothing_left(env: AppEnv) -> Iterator[None]:
    before = {m.__name__: env.count(m) for m in (Dataset, Record, Subject, Source)}
    files = env.artifact_files()
    yield
    assert {m.__name__: env.count(m) for m in (Dataset, Record, Subject, Source)} == before
    assert env.artifact_files() == files


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4200, 4100)).save(buf, format="PNG")
    return buf.getvalue()


def _refused_cases() -> dict[str, tuple[bytes, str, str, str]]:
    """id -> (archive, kind, code, a name the message must hold)."""
    img = gen.rows("image", n_subjects=4, seed=3)
    aud = gen.rows("audio", n_subjects=4, seed=3)
    rng = np.random.default_rng(0)
    bad_png = [dict(r) for r in img]
    bad_png[1]["media"] = b"\x89PNG not really"
    narrow = [dict(r) for r in aud]
    narrow[2]["media"] = gen.wav(440.0, rng, width=1)
    huge = [dict(r) for r in img]
    huge[0]["media"] = _big_png()
    not_wav = [dict(r) for r in aud]
    not_wav[0]["media"] = b"RIFF....WAVEjunk"
    return {
        "path traversal": (
            gen.zip_bytes(img, "image", extra={"../evil.png": b"x"}),
            "image",
            "invalid_archive",
            "../evil.png",
        ),
        "absolute path": (
            gen.zip_bytes(img, "image", extra={"/etc/evil": b"x"}),
            "image",
            "invalid_archive",
            "/etc/evil",
        ),
        "zip bomb": (
            gen.zip_bytes(img, "image", extra={"bomb.bin": bytes(8 * 2**20)}),
            "image",
            "invalid_archive",
            "bomb.bin",
        ),
        "missing file": (
            gen.zip_bytes(img, "image", drop={img[2]["name"]}),
            "image",
            "invalid_archive",
            img[2]["name"],
        ),
        "undecodable image": (
            gen.zip_bytes(bad_png, "image"),
            "image",
            "invalid_media",
            bad_png[1]["name"],
        ),
        "oversize image": (gen.zip_bytes(huge, "image"), "image", "invalid_media", huge[0]["name"]),
        "8-bit WAV": (gen.zip_bytes(narrow, "audio"), "audio", "invalid_media", narrow[2]["name"]),
        "not a WAV": (
            gen.zip_bytes(not_wav, "audio"),
            "audio",
            "invalid_media",
            not_wav[0]["name"],
        ),
        "no manifest": (
            gen.zip_bytes(img, "image", manifest="none"),
            "image",
            "invalid_archive",
            "manifest.csv",
        ),
        "not a zip": (b"PK\x03\x04 truncated", "image", "invalid_archive", "zip"),
    }


CASES = _refused_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_archives_are_refused_naming_the_file(
    env: AppEnv, keys: dict[str, str], nothing_left: None, case: str
) -> None:
    data, kind, code, name = CASES[case]
    resp = post_dataset(env.client, keys["admin"], data, gen.spec(f"bad-{kind}", kind), "d.zip")
    err = assert_error(resp, 422, code)
    assert name in err["message"], err


def test_media_column_of_the_wrong_type_is_refused(
    env: AppEnv, keys: dict[str, str], nothing_left: None
) -> None:
    recs = gen.rows("text", n_subjects=4, seed=4)
    resp = post_dataset(
        env.client,
        keys["admin"],
        gen.parquet_bytes(recs),
        gen.spec("strings", "image"),
        "d.parquet",
    )
    err = assert_error(resp, 422, "invalid_file")
    assert "binary" in err["message"]
