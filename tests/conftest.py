"""Suite-wide guard, and the shared fixtures (`tests.support.fixtures`); fixtures that
only one suite uses live beside it."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.fixtures"]


def pytest_collection_finish(session: pytest.Session) -> None:
    # "No tests ran" must be a failure, never a silent green.
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests were collected")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `cuda` tests run where torch sees a CUDA device (bench/gpu.sh); elsewhere they skip
    # and say why, instead of failing or vanishing.
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in cuda_items:
        item.add_marker(reason)
