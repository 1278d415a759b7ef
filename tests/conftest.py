"""Fixtures: one real embedded PostgreSQL + pgvector (pgserver) per test session, a fresh database
per test, and helpers to write specs and run the CLI in-process."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL 16 with pgvector, started for this session and stopped after it."""
    import pgserver

    root = tmp_path_factory.mktemp("pg")
    server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


def with_dbname(url: str, dbname: str) -> str:
    info = conninfo_to_dict(url)
    info["dbname"] = dbname
    return make_conninfo(**info)


@pytest.fixture
def db_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_dbname(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(body: str) -> Path:
        path = tmp_path / "vectorsync.toml"
        path.write_text(textwrap.dedent(body))
        return path

    return write


@pytest.fixture
def cli(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliResult]:
    """Run ``vectorsync ARGS`` in-process against the test database; returns code and output."""
    from sync.cli import main_entry

    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", db_url)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str, config: Path | None = None) -> CliResult:
        capsys.readouterr()
        argv = ["--config", str(config or tmp_path / "vectorsync.toml"), *args]
        code = main_entry(argv)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
