"""Database connections: URL precedence, the embedded default (sync/embedded.py), and start-up checks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.abc import Params

from vectorsync.errors import DatabaseError
from vectorsync.migrations.operations import KEY_TEXT_SETTINGS

log = logging.getLogger(__name__)

ENV_URL = "VECTORSYNC_DATABASE_URL"
ENV_DATA_DIR = "VECTORSYNC_DATA_DIR"


def data_dir(config_path: str | Path | None) -> Path:
    """Where the embedded server keeps its files: ``VECTORSYNC_DATA_DIR`` or ``.vectorsync/``
    beside the config file."""
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser().resolve()
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    return base / ".vectorsync"


def embedded_url(directory: Path) -> str:
    """Start (or join) the embedded PostgreSQL + pgvector in ``directory`` and return its URL."""
    from vectorsync.sync import embedded

    return embedded.start(directory, notify=lambda line: log.warning("%s", line))


def stop_embedded(directory: Path) -> bool:
    """Stop the embedded server in ``directory`` if it runs; return whether one was stopped."""
    from vectorsync.sync import embedded

    return embedded.stop(directory)


def configured_url(cli_url: str | None, config_url: str | None) -> str | None:
    """``--database-url`` > ``VECTORSYNC_DATABASE_URL`` > ``[database] url``; None: the embedded default."""
    return next((c for c in (cli_url, os.environ.get(ENV_URL), config_url) if c), None)


def resolve_url(cli_url: str | None, config_url: str | None, config_path: str | Path | None) -> str:
    """The configured URL, or the embedded server's (started if need be)."""
    return configured_url(cli_url, config_url) or embedded_url(data_dir(config_path))


def describe(cli_url: str | None, config_url: str | None, config_path: str | Path | None, url: str) -> str:
    """Which server ``url`` is, for humans: the embedded one names its data folder."""
    if configured_url(cli_url, config_url):
        return redact(url)
    return f"embedded PostgreSQL in {data_dir(config_path)} ({redact(url)})"


def session_options(url: str) -> str:
    """The URL's ``options`` plus the settings keys are written as text under (``KEY_TEXT_SETTINGS``),
    so keys this session reads or writes as text match those the capture trigger queued."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(url).get("options") or ""
    except psycopg.ProgrammingError:
        given = ""
    pinned = " ".join(f"-c {name}={value.replace(' ', '')}" for name, value in KEY_TEXT_SETTINGS.items())
    return f"{given} {pinned}".strip()


def connect(url: str, *, autocommit: bool = False, vector: bool = True, **params: Any) -> psycopg.Connection:
    """Open a connection with pgvector's types registered; one clear error when it fails.

    ``params`` are extra libpq connection parameters (e.g. TCP keepalives) laid over the URL's.
    """
    try:
        conn = psycopg.connect(
            url, autocommit=autocommit, connect_timeout=10, options=session_options(url), **params
        )
    except psycopg.ProgrammingError as exc:
        # libpq refuses the URL itself before trying to connect
        raise DatabaseError(
            f"the database URL {redact(url)!r} is malformed: {_one_line(exc)}",
            hint="write it as postgresql://user:password@host:port/dbname",
        ) from None
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database at {redact(url)}: {_one_line(exc)}") from None
    if vector:
        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            # The extension is not created yet (before the first migrate); types register later.
            conn.rollback()
    return conn


def scalar(conn: psycopg.Connection[Any], query: str | sql.SQL | sql.Composed, params: Params | None = None) -> Any:
    """The first value of the one row ``query`` returns (a count, EXISTS, to_regclass...)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise DatabaseError(f"the query returned no row where one was expected: {query!r}")
    return row[0]


@contextmanager
def connection(url: str, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    conn = connect(url, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def ensure_vector_extension(conn: psycopg.Connection) -> None:
    """Create pgvector if missing; a server without it gets one clear error saying how to fix it."""
    row = conn.execute(
        "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = 'vector'"
    ).fetchone()
    if row is None:
        raise DatabaseError(
            "the PostgreSQL server has no 'vector' extension available; install pgvector "
            "(https://github.com/pgvector/pgvector#installation, e.g. apt install postgresql-16-pgvector) "
            "or use the embedded default by unsetting VECTORSYNC_DATABASE_URL"
        )
    if row[1] is None:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege:
            conn.rollback()
            raise DatabaseError(
                "the 'vector' extension is available but not created, and this role may not create it; "
                "ask a superuser to run: CREATE EXTENSION vector"
            ) from None
    register_vector(conn)


def _one_line(exc: BaseException) -> str:
    """libpq's message, whose lines and tab indents become single spaces."""
    return " ".join(str(exc).split()) or type(exc).__name__


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid url>"
    if info.get("password"):
        info["password"] = "***"
    return psycopg.conninfo.make_conninfo("", **{k: v for k, v in info.items() if v is not None})

