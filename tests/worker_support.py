"""Helpers for the worker tests: a small tabular table, real ``vectorsync worker`` processes, waiting,
and checking stored vectors against encoding the final rows with the stored model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from vectorsync.sync import sources
from vectorsync.sync.catalog import load
from vectorsync.sync.cli import main_entry
from vectorsync.sync.models import ModelCache, current_version
from vectorsync.sync.spec import load_config

REPO = Path(__file__).resolve().parent.parent

ITEMS_SPEC = """
[worker]
batch_size = {batch_size}
batch_deadline_seconds = {deadline}
max_wait_ms = 10
poll_seconds = 1.0
max_attempts = 3
backoff_seconds = 0.2

[[embeddings]]
name = "items"
table = "items"
key = "id"
modality = "tabular"
dim = 8
index = "{index}"
columns = ["a", "b", "c", "kind"]
encoder = {{ type = "autoencoder", seed = 1, epochs = {epochs}, hidden = [16] }}
"""


def items_spec(
    path: Path, *, batch_size: int = 100, index: str = "hnsw", epochs: int = 3, deadline: float = 60.0
) -> Path:
    """The ``items`` spec; ``deadline`` is ``batch_deadline_seconds``, how long a lease lasts."""
    path.write_text(
        textwrap.dedent(ITEMS_SPEC.format(batch_size=batch_size, index=index, epochs=epochs, deadline=deadline))
    )
    return path


def create_items(conn: psycopg.Connection, rows: int) -> None:
    """``items``: numeric, double, numeric(10,2) and categorical inputs, plus a non-input ``note``."""
    conn.execute(
        "CREATE TABLE items (id integer PRIMARY KEY, a real, b double precision, c numeric, kind text, note text)"
    )
    insert_items(conn, 0, rows)


def insert_items(conn: psycopg.Connection, start: int, count: int) -> None:
    conn.execute(
        "INSERT INTO items (id, a, b, c, kind) SELECT g, (g %% 97) / 10.0, sin(g), g %% 13, 'k' || (g %% 5) "
        "FROM generate_series(%s::int, %s::int - 1) g",
        (start, start + count),
    )


def vectorsync(url: str, config: Path, *args: str) -> None:
    """Run a CLI command in-process against ``url``; fail the test with its output if it fails."""
    code = main_entry(["--config", str(config), "--database-url", url, *args])
    assert code == 0, f"vectorsync {' '.join(args)} exited {code}"


def prepare(url: str, config: Path) -> None:
    vectorsync(url, config, "migrate")
    vectorsync(url, config, "train", "items")


class WorkerProcess:
    """``python -m sync.cli worker`` as a child process, its output in a log file."""

    def __init__(self, url: str, config: Path, log: Path, *args: str) -> None:
        self.log = log
        env = {**os.environ, "VECTORSYNC_DATABASE_URL": url, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "--config", str(config), "worker", *args],
            cwd=REPO,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._out.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def scalar(conn: psycopg.Connection, query: str, params: Sequence[Any] | None = None) -> Any:
    return conn.execute(query, params).fetchone()[0]


def drained(conn: psycopg.Connection, expected_rows: int) -> bool:
    return (
        scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 0
        and scalar(conn, "SELECT count(*) FROM items_embeddings") == expected_rows
    )


def worker_totals(conn: psycopg.Connection) -> tuple[int, int]:
    """Sum of the per-worker ``embedded`` and ``failed`` counters (moved in each batch's transaction)."""
    embedded, failed = conn.execute(
        "SELECT coalesce(sum(embedded), 0), coalesce(sum(failed), 0) FROM vectorsync.workers"
    ).fetchone()
    return int(embedded), int(failed)


def serving_table(conn: psycopg.Connection) -> str:
    """The quoted name of the table that holds the generation of ``items`` in service."""
    return str(scalar(
        conn,
        "SELECT format('%I.%I', table_schema, table_name) FROM vectorsync.generations "
        "WHERE embedding = 'items' AND state = 'serving'",
    ))


def add_slow_writes(conn: psycopg.Connection, seconds: float) -> None:
    """Make every batch's write into the generation in service sleep, so a test can act while a
    batch is in flight (``remove_slow_writes`` ends it)."""
    table = serving_table(conn)
    conn.execute(
        f"""
        CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
        CREATE TRIGGER slow_write BEFORE INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION slow_write();
        """
    )


def remove_slow_writes(conn: psycopg.Connection) -> None:
    conn.execute(f"DROP TRIGGER slow_write ON {serving_table(conn)}")


def batch_in_flight(conn: psycopg.Connection) -> bool:
    return bool(
        scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep' "
            "AND pid <> pg_backend_pid()",
        )
    )


def assert_vectors_match_rows(conn: psycopg.Connection, config: Path) -> int:
    """Every source row has a vector from the current model that equals encoding its current values
    with the stored model; returns the number of rows checked."""
    spec = load_config(config).embedding("items")
    emb = load(conn, spec)
    version = current_version(conn, "items")
    encoder = ModelCache().get(conn, emb, version)
    keys = [r[0] for r in conn.execute("SELECT id::text FROM items ORDER BY id")]
    with conn.transaction():
        frame = sources.read_rows(conn, emb, keys).sort_values(sources.KEY).reset_index(drop=True)
    expected = encoder.encode(frame)
    assert not expected.failures
    stored = {
        key: (vector, model, digest)
        for key, vector, model, digest in conn.execute(
            "SELECT id::text, embedding::real[], model_version, input_hash FROM items_embeddings"
        )
    }
    assert set(stored) == set(keys)
    got = np.array([stored[k][0] for k in frame[sources.KEY]], dtype=np.float32)
    assert {stored[k][1] for k in keys} == {version}
    assert [stored[k][2] for k in frame[sources.KEY]] == frame[sources.HASH].tolist()
    np.testing.assert_allclose(got, expected.vectors, atol=1e-5)
    return len(keys)
