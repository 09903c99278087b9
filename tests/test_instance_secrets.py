"""Secrets of an install: never a public default. Embedded installs make their own on
first use (owner-only, beside the signing key); an install that already holds subjects
keeps the pepper its subject keys were made with; production refuses to start without
configured ones."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.settings import DEV_PEPPER, Settings


def _embedded(folder: Path, **kw: str) -> Settings:
    return Settings(
        database_url=f"sqlite:///{folder / 'db.sqlite'}",
        signing_key_file=str(folder / "keys" / "signing-key.pem"),
        **kw,  # type: ignore[arg-type]
    )


def test_a_new_install_makes_random_secrets_once(tmp_path: Path) -> None:
    a = _embedded(tmp_path / "a")
    assert a.is_production is False
    pepper, secret = a.pepper, a.session_secret
    assert DEV_PEPPER not in (pepper, secret) and pepper != secret
    assert len(pepper) >= 40 and len(secret) >= 40
    path = tmp_path / "a" / "keys" / "instance-secrets.json"
    assert a.secrets_path == path
    assert path.stat().st_mode & 0o777 == 0o600
    # Every process of the install (a fresh Settings) reads the same ones.
    again = _embedded(tmp_path / "a")
    assert (again.pepper, again.session_secret) == (pepper, secret)
    # Another install has others.
    other = _embedded(tmp_path / "b")
    assert other.pepper != pepper and other.session_secret != secret
    # Configured secrets win over the file.
    configured = _embedded(
        tmp_path / "a", subject_pepper="p" * 32, dashboard_session_secret="s" * 32
    )
    assert (configured.pepper, configured.session_secret) == ("p" * 32, "s" * 32)


def test_an_install_with_subjects_keeps_its_pepper(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    with sqlite3.connect(folder / "db.sqlite") as conn:
        conn.execute("CREATE TABLE subjects (id TEXT PRIMARY KEY, subject_key TEXT)")
        conn.execute("INSERT INTO subjects VALUES ('s1', 'k1')")
    s = _embedded(folder)
    # Its subject keys were made with the old default: a new pepper would make every
    # person's data unfindable by an erasure request.
    assert s.pepper == DEV_PEPPER
    stored = json.loads(s.secrets_path.read_text())
    assert stored["subject_pepper"] == DEV_PEPPER and stored["legacy_pepper"] is True
    # The dashboard secret is random even so.
    assert s.session_secret != DEV_PEPPER
    # Decided once: deleting the subjects later changes nothing.
    with sqlite3.connect(folder / "db.sqlite") as conn:
        conn.execute("DELETE FROM subjects")
    assert _embedded(folder).pepper == DEV_PEPPER


def test_an_empty_migrated_database_gets_a_random_pepper(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    with sqlite3.connect(folder / "db.sqlite") as conn:
        conn.execute("CREATE TABLE subjects (id TEXT PRIMARY KEY, subject_key TEXT)")
    assert _embedded(folder).pepper != DEV_PEPPER


@pytest.mark.parametrize(
    "values",
    [
        {"database_url": "postgresql+psycopg://u@db/x"},  # a server database: production
        {"database_url": "postgresql+psycopg://u@db/x", "subject_pepper": "p" * 32},
        {"database_url": "postgresql+psycopg://u@db/x", "dashboard_session_secret": "s" * 32},
        {"environment": "production"},
        {
            "environment": "production",
            "subject_pepper": DEV_PEPPER,
            "dashboard_session_secret": "s" * 32,
        },
    ],
)
def test_production_refuses_to_start_without_secrets(values: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="production needs"):
        Settings(**values)  # type: ignore[arg-type]


def test_production_with_secrets_and_explicit_development(tmp_path: Path) -> None:
    s = Settings(
        database_url="postgresql+psycopg://u@db/x",
        subject_pepper="p" * 32,
        dashboard_session_secret="s" * 32,
    )
    assert s.is_production and s.pepper == "p" * 32
    assert not s.secrets_path.exists() or s.secrets_path.parent != tmp_path
    # An explicit non-production environment may use a server database (tests, a
    # one-host setup); its secrets are then its own, made on first use.
    dev = Settings(environment="test", database_url="postgresql+psycopg://u@db/x")
    assert not dev.is_production


def test_the_api_refuses_to_start_in_production_without_secrets(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PALIMPSEST_") or k.startswith("PALIMPSEST_TEST_")
    }
    env["PALIMPSEST_DATABASE_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "api", "--port", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "PALIMPSEST_SUBJECT_PEPPER" in out.stderr
    assert "PALIMPSEST_DASHBOARD_SESSION_SECRET" in out.stderr
    assert "Traceback" not in out.stderr
