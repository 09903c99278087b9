"""Secrets of one embedded install: made on first use, kept beside the signing key.

Without configured secrets, the subject pepper (the HMAC key of subject ids) and the
dashboard's session secret are random values written once to a JSON file with mode
0600. Nothing is ever derived from a public default: an attacker who knows the code
could otherwise forge dashboard sessions, or reverse subject keys by enumeration.

One exception keeps existing installs working: a database that already holds subjects
made its subject keys with the old public development pepper, and a new pepper would
make every one of them unfindable (a person's erasure request would find no data). Such
an install keeps that pepper (persisted, so the decision is made once) and is told to
re-key; new installs never get it.

Production (see `Settings.is_production`) never comes here: it must configure both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

# The pepper every install used before secrets were generated. Only ever kept for a
# database whose subject keys were made with it.
LEGACY_DEV_PEPPER = "palimpsest-development-pepper-change-me"


@dataclass(frozen=True)
class InstanceSecrets:
    subject_pepper: str
    dashboard_session_secret: str
    legacy_pepper: bool = False


def _has_subjects(database_url: str) -> bool:
    """Whether the database already holds subject keys. A database that does not exist
    yet, or has no `subjects` table, has none."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1] if ":///" in database_url else ""
        if not path or path == ":memory:" or not Path(path).exists():
            return False
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("subjects"):
                return False
            return conn.execute(text("SELECT 1 FROM subjects LIMIT 1")).first() is not None
    finally:
        engine.dispose()


def _read(path: Path) -> InstanceSecrets:
    data = json.loads(path.read_text())
    return InstanceSecrets(
        subject_pepper=str(data["subject_pepper"]),
        dashboard_session_secret=str(data["dashboard_session_secret"]),
        legacy_pepper=bool(data.get("legacy_pepper", False)),
    )


def load_or_create(path: str | Path, database_url: str) -> InstanceSecrets:
    """The install's secrets at `path`, created on first use (mode 0600).

    API and worker may start at once: each writes a complete private temp file and
    hard-links it into place, which fails if the name exists; the loser reads the
    winner's, so both use the same pepper.
    """
    path = Path(path)
    if path.exists():
        return _read(path)
    legacy = _has_subjects(database_url)
    if legacy:
        log.warning(
            "this database's subject keys were made with the public development pepper; "
            "it is kept in %s so they stay findable. Re-key the install with a secret "
            "PALIMPSEST_SUBJECT_PEPPER.",
            path,
        )
    body = {
        "subject_pepper": LEGACY_DEV_PEPPER if legacy else secrets.token_urlsafe(32),
        "dashboard_session_secret": secrets.token_urlsafe(32),
        "legacy_pepper": legacy,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)
