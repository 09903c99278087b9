"""Fixtures for the dashboard tests: a migrated database per module and a key per role."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.app_env import AppEnv, app_env
from tests.support.factories import create_key


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppEnv]:
    folder: Path = tmp_path_factory.mktemp("dashboard")
    with app_env(folder) as e:
        yield e


@pytest.fixture(scope="module")
def keys(env: AppEnv) -> dict[str, str]:
    return {
        "admin": create_key("admin", "dash-admin"),
        "auditor": create_key("auditor", "dash-auditor"),
        "portal": create_key("portal", "dash-portal"),
    }
