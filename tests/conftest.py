"""Suite-wide guard only; fixtures live beside the tests that use them."""

from __future__ import annotations

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    # "No tests ran" must be a failure, never a silent green.
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests were collected")
