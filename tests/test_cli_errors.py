"""The CLI's one error path: a VectorsyncError is one line (and a hint) with exit 1; any other
exception is a bug, shown as a one-line hint, or as its traceback with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vectorsync.errors import DatabaseError, InputError, MissingExtraError, ModelError, SpecError, VectorsyncError

ROOT = Path(__file__).resolve().parent.parent

# A command that fails with an exception vectorsync never raises on purpose: a stand-in for a bug.
_BUGGY_CLI = """
import sys
from vectorsync.sync.cli import app, main_entry

@app.command("explode")
def explode() -> None:
    {}.pop("missing")

sys.exit(main_entry(sys.argv[1:]))
"""


def _run_buggy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BUGGY_CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_every_error_class_users_meet_is_in_the_tree():
    from vectorsync.encoders.base import InputError as EncoderInputError
    from vectorsync.encoders.minilm import ModelFileError
    from vectorsync.migrations.operations import SchemaChangeError
    from vectorsync.sync.catalog import NotMigrated
    from vectorsync.sync.db import DatabaseError as DbDatabaseError
    from vectorsync.sync.models import NoModel
    from vectorsync.sync.neo4j_bridge import BridgeError
    from vectorsync.sync.schema import SpecMismatch
    from vectorsync.sync.spec import SpecError as SpecSpecError

    assert SpecSpecError is SpecError and DbDatabaseError is DatabaseError and EncoderInputError is InputError
    for cls in (SpecMismatch, SchemaChangeError, NotMigrated, BridgeError, NoModel, ModelFileError, MissingExtraError):
        assert issubclass(cls, VectorsyncError), cls
    assert issubclass(ModelFileError, ModelError) and issubclass(NoModel, ModelError)


def test_missing_extra_names_the_extra_to_install(monkeypatch):
    from vectorsync.encoders import face

    face._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # importing dlib now raises ImportError
    try:
        with pytest.raises(MissingExtraError, match=r"pip install 'vectorsync\[faces\]'") as caught:
            face._dlib_models()
    finally:
        face._dlib_models.cache_clear()
    assert caught.value.extra == "faces" and isinstance(caught.value, ImportError)


def test_unexpected_error_is_a_one_line_hint_without_verbose():
    result = _run_buggy("explode")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unexpected error: KeyError" in result.stderr
    assert "rerun with --verbose and report it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2


def test_unexpected_error_shows_its_traceback_with_verbose():
    result = _run_buggy("--verbose", "explode")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "KeyError" in result.stderr and "explode" in result.stderr


def test_migrate_against_an_unresolvable_server_is_one_line(cli, write_config, monkeypatch):
    config = write_config("")
    # the README's placeholder URL: "host" resolves nowhere
    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", "postgresql://user:pass@host.invalid/db")
    result = cli("migrate", config=config)
    assert result.code == 1, result.err
    assert "cannot connect to the database" in result.err and "pass@" not in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_migrate_against_an_unreachable_server_is_one_line(cli, write_config, monkeypatch):
    config = write_config("")
    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", "postgresql://nobody:wrong@127.0.0.1:9/none")
    result = cli("migrate", config=config)
    assert result.code == 1, result.err
    assert "cannot connect to the database" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert "  " not in result.err.strip(), "libpq's tab-indented second line must become one space"


def test_malformed_database_url_is_one_line_with_a_hint(cli, write_config):
    config = write_config("")
    result = cli("--database-url", "postgresql://u@h:notaport/db?sslmode", "status", config=config)
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error: the database URL") and "malformed" in lines[0]
    assert lines[1].startswith("hint: write it as postgresql://") and len(lines) == 2


def test_search_with_a_key_of_the_wrong_type_is_one_line(conn, write_config, cli):
    conn.execute("CREATE TABLE products (id integer PRIMARY KEY, price real)")
    conn.execute("INSERT INTO products VALUES (1, 2.5), (2, 3.5)")
    config = write_config(
        """
        [[embeddings]]
        name = "products"
        table = "products"
        key = "id"
        modality = "tabular"
        dim = 2
        columns = ["price"]
        """
    )
    assert cli("migrate", config=config).code == 0
    result = cli("search", "products", "abc", config=config)
    assert result.code == 1, result.err
    assert "key 'abc'" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_version_flag_prints_the_version():
    import vectorsync

    result = subprocess.run(
        [sys.executable, "-m", "vectorsync", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"vectorsync {vectorsync.__version__}"


def test_help_shows_on_off_flags_without_a_value():
    result = subprocess.run(
        [sys.executable, "-m", "vectorsync", "status", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    json_line = next(line for line in result.stdout.splitlines() if "--json" in line)
    assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout, result.stdout
    assert "Machine-readable output." in json_line

