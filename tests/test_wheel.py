"""The built wheel installs into a fresh virtual environment and runs the demo from a folder that
has a ``migrations`` package and a ``sync.py`` of its own: the distribution claims no import name
but ``vectorsync``, and the wheel carries everything the demo needs (SQL, revisions, templates)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".vectorsync", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv")


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo_beside_a_users_migrations_and_sync(tmp_path):
    source = tmp_path / "source"  # a copy, so building leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=_SKIP)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ".",
        cwd=source)
    (wheel,) = (tmp_path / "dist").glob("vectorsync-*.whl")

    venv = tmp_path / "venv"
    # system site-packages provide the dependencies (no network); the venv's own vectorsync must win
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "vectorsync"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    project = tmp_path / "project"  # a user's project whose names vectorsync must not collide with
    (project / "migrations").mkdir(parents=True)
    (project / "migrations" / "__init__.py").write_text("raise ImportError('the project migrations were imported')\n")
    (project / "sync.py").write_text("raise ImportError('the user project sync.py was imported')\n")
    env = {**os.environ, "VECTORSYNC_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "120"}
    env.pop("VECTORSYNC_DATABASE_URL", None)
    env.pop("VECTORSYNC_CONFIG", None)

    imported = run(python, "-c", "import vectorsync.sync.cli, vectorsync; print(vectorsync.__file__)",
                   cwd=project, env=env)
    assert Path(imported.strip()).is_relative_to(venv), imported  # not the editable checkout
    assert run(python, "-m", "vectorsync", "--version", cwd=project, env=env).startswith("vectorsync ")
    try:
        output = run(script, "demo", cwd=project, env=env)
        assert "neighbours sharing the cultivar" in output, output
    finally:
        subprocess.run([script, "db-stop"], cwd=project, env=env, capture_output=True, timeout=120)
    assert not (project / ".vectorsync").exists()  # the data went where VECTORSYNC_DATA_DIR said
