"""Fixtures shared by the suites that run the API in-process (a plugin of the root
conftest). `env` is a fresh service per test; a suite that only reads and adds (the API
contract, the dashboard, webhooks, certificates) takes one per module in its conftest
with `from tests.support.module_env import env`; `keys` gives one raw key per role, plus
a second portal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.app_env import AppEnv, app_env
from tests.support.factories import create_key


@pytest.fixture(name="env")
def function_env(tmp_path: Path) -> Iterator[AppEnv]:
    """A migrated database, an artifact folder and `TestClient(create_app())`."""
    with app_env(tmp_path) as e:
        yield e


@pytest.fixture(scope="module")
def keys(env: AppEnv) -> dict[str, str]:
    """One raw key per role , plus a second portal (`portal_b`)."""
    return {
        "admin": create_key("admin"),
        "portal": create_key("portal", "portal-a"),
        "portal_b": create_key("portal", "portal-b"),
        "auditor": create_key("auditor"),
    }
