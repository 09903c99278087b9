"""One service per module: a suite's conftest imports `env` from here to override the
per-test `env` of `tests.support.fixtures` (not a plugin itself, so it overrides only
where it is imported)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.app_env import AppEnv, app_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppEnv]:
    with app_env(tmp_path_factory.mktemp("env")) as e:
        yield e
