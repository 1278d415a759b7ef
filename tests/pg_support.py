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
