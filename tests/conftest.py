"""Suite-wide guard, and the shared fixtures (`tests.support.fixtures`); fixtures that
only one suite uses live beside it."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.fixtures"]


def pytest_collection_finish(session: pytest.Session) -> None:
    # "No tests ran" must be a failure, never a silent green.
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests were collected")
