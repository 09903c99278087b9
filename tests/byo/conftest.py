"""The bring-your-own-model tests: the example plugin package must be installed (the
Makefile's venv step installs it; a venv set up by hand gets it here, once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.ml import plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "palimpsest-example-architectures"


def _ensure_example_plugin() -> None:
    if "example-resmlp" in plugins.installed():
        return
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-e", str(EXAMPLE)], check=True)
    import importlib
    import site

    importlib.invalidate_caches()
    for d in site.getsitepackages():
        if any(Path(d).glob("__editable__*palimpsest_example*.pth")):
            site.addsitedir(d)  # picks up the new .pth (its path or finder) in this process
    plugins.refresh()


_ensure_example_plugin()

from tests.support.module_env import env  # noqa: E402  (one service per module)

__all__ = ["env"]
