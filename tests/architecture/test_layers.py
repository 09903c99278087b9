"""The layering is enforced by import-linter (`make lint` runs `lint-imports`); these
tests show that the contracts hold on the tree and that they fail when broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("app", "workers"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def _inject(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}\n")


def test_a_cycle_between_packages_breaks_the_build(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    # The registry reaching back into requests, which builds on the registry.
    _inject(tree, "app/registry/artifacts.py", "from app.requests import lifecycle  # noqa")
    result = _lint(tree)
    assert result.returncode != 0
    assert "app.registry is not allowed to import app.requests" in result.stdout
    assert "No import cycles between the app's packages BROKEN" in result.stdout


def test_the_engine_and_the_core_import_nothing_above_them(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _inject(tree, "app/ml/metrics.py", "from app.core import settings  # noqa")
    _inject(tree, "app/core/chunks.py", "import workers.celery_app  # noqa")
    result = _lint(tree)
    assert result.returncode != 0
    assert "app.ml is not allowed to import app.core" in result.stdout
    assert "app.core -> workers" in result.stdout or "app.core.chunks -> workers" in result.stdout
