"""Fixtures for the API tests: one migrated database per module, keys per role."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.app_env import AppEnv, app_env
from tests.support.factories import create_key


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppEnv]:
    folder: Path = tmp_path_factory.mktemp("palimpsest")
    with app_env(folder) as e:
        yield e


@pytest.fixture(scope="module")
def keys(env: AppEnv) -> dict[str, str]:
    """One raw key per role, plus a second portal (`portal_b`)."""
    return {
        "admin": create_key("admin"),
        "portal": create_key("portal", "portal-a"),
        "portal_b": create_key("portal", "portal-b"),
        "auditor": create_key("auditor"),
    }
