"""Build the API against a fresh, migrated database with its own artifact folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.support.database import fresh_database


def clear_caches() -> None:
    """Forget settings, the Celery app and pooled engines built from an older env."""
    from app.core.db import dispose_engines
    from app.core.settings import get_settings
    from workers.celery_app import get_celery

    get_settings.cache_clear()
    get_celery.cache_clear()
    dispose_engines()


@dataclass
class AppEnv:
    client: TestClient
    folder: Path
    database_url: str
    artifact_root: Path

    def artifact_files(self) -> set[str]:
        """Every file under the artifact root, relative to it."""
        if not self.artifact_root.exists():
            return set()
        return {
            str(p.relative_to(self.artifact_root))
            for p in self.artifact_root.rglob("*")
            if p.is_file()
        }

    def count(self, model: type) -> int:
        from app.core.db import session_scope

        with session_scope() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)


@contextmanager
def app_env(folder: Path, backend: str | None = None) -> Iterator[AppEnv]:
    """Environment, migrations and a `TestClient(create_app())`; undone on exit.

    The broker is kombu's in-memory transport: tasks enqueued after commit are sent
    nowhere, so these tests exercise the API alone (the integration tests run workers).
    """
    from app.cli import upgrade_database
    from app.main import create_app

    artifacts = folder / "artifacts"
    with fresh_database(folder, backend) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PALIMPSEST_ENVIRONMENT", "test")
        mp.setenv("PALIMPSEST_DATABASE_URL", url)
        mp.setenv("PALIMPSEST_ARTIFACT_ROOT", str(artifacts))
        mp.setenv("PALIMPSEST_BROKER_URL", "memory://")
        mp.setenv("PALIMPSEST_RESULT_BACKEND", "cache+memory://")
        mp.setenv("PALIMPSEST_SIGNING_KEY_FILE", str(folder / "keys" / "signing-key.pem"))
        mp.setenv("PALIMPSEST_DEVICE", "cpu")
        # The tests' webhook receivers listen on loopback, which is refused by default.
        mp.setenv("PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
        clear_caches()
        try:
            upgrade_database(url)
            with TestClient(create_app(), raise_server_exceptions=False) as client:
                yield AppEnv(client, folder, url, artifacts)
        finally:
            clear_caches()
