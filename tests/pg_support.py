"""Starting throw-away embedded PostgreSQL servers for tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def embedded_server() -> Iterator[Any]:
    """A real PostgreSQL 16 with pgvector (pgserver) in a folder of its own, removed afterwards.

    Not under pytest's tmp_path: pgserver runs PostgreSQL as its own user, which needs to reach the
    folder, and pytest keeps its base folder private and prunes it while other sessions run.
    """
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="vectorsync-pg-"))
    root.chmod(0o755)
    server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()
        if (root / "pgdata" / "postmaster.pid").exists():
            # pgserver only stops a server when it believes this process holds the last handle
            from pgserver._commands import pg_ctl

            try:
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=root / "pgdata", user=server.system_user)
            except Exception:  # already gone: nothing to stop
                pass
        shutil.rmtree(root, ignore_errors=True)


def nearest_label_agreement(conn: Any, name: str, labels: dict[str, Any], k: int = 5, step: int = 5) -> float:
    """Share of the k nearest neighbours (found by ``vectorsync.nearest``) that carry the row's
    label, over every ``step``-th row (keys in numeric order)."""
    agree = total = 0
    for key in sorted(labels, key=int)[::step]:
        for neighbour, _ in conn.execute("SELECT * FROM vectorsync.nearest(%s, %s, %s)", (name, key, k)):
            agree += labels[neighbour] == labels[key]
            total += 1
    return agree / total
