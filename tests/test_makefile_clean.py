"""`make clean` removes tool caches only; results and unsynced W&B runs need `make clean-results`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = [
    "multirun/2026-01-01/10-00-00/layer=3/results.json",
    "multirun/2026-01-01/10-00-00/layer=3/wandb/offline-run-20260101_100000-abc/run-abc.wandb",
    "outputs/2026-01-01/10-00-00_tiny_unmatched_L3/results.json",
    "outputs/2026-01-01/10-00-00_tiny_unmatched_L3/wandb/offline-run-x/run-x.wandb",
]
CACHES = [
    ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/0.1/x",
    ".mypy_cache/3.11/x.json",
    ".hypothesis/examples/x",
    "src/abliterate/__pycache__/x.cpython-311.pyc",
    "tests/__pycache__/y.cpython-311.pyc",
]
KEPT_ALWAYS = [".venv/lib/__pycache__/z.pyc", "src/abliterate/export.py"]


@pytest.fixture
def tree(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for name in RESULTS + CACHES + KEPT_ALWAYS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    return tmp_path


def _make(tree: Path, target: str) -> None:
    subprocess.run(["make", "-s", "-C", str(tree), target], check=True, timeout=60)


def test_clean_keeps_results_and_wandb_runs(tree):
    _make(tree, "clean")
    assert all((tree / name).is_file() for name in RESULTS + KEPT_ALWAYS)
    assert not any((tree / name).exists() for name in CACHES)


def test_clean_results_is_the_explicit_way_to_delete_sweeps(tree):
    _make(tree, "clean-results")
    assert not (tree / "multirun").exists() and not (tree / "outputs").exists()
    assert all((tree / name).is_file() for name in CACHES + KEPT_ALWAYS)
