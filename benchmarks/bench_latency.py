"""Change-to-vector latency with an idle worker, and throughput / lag under a continuous writer.

Latency: single-row updates of an input column, one at a time, against a running ``vectorsync
worker`` process (LISTEN/NOTIFY, default ``max_wait_ms``). Each is timed from the start of the
autocommitted UPDATE to the moment a NOTIFY sent by a row trigger on the target table arrives, which
is delivered when the worker's batch commits: the vector is then visible to every session. The
observer waits on its socket (no polling); its wake-up and the target trigger's NOTIFY are the only
costs it adds. The UPDATE's own commit, which waits for the WAL flush, is part of each figure and is
reported on its own.

Baseline, measured in the same run: the same worker loop with LISTEN replaced by polling every
second (a poll-based design like pgai's vectorizer worker, whose default interval is minutes, not
one second), over fewer updates because each costs about half a second.

Throughput: a writer inserts small transactions at a fixed pace while the worker runs; we sample
the lag (age of the oldest queued change) throughout and report embedded rows/s against the
achieved insert rate.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from benchmarks.common import Figure, scratch_database
from vectorsync.sync.cli import main_entry
from vectorsync.sync.spec import load_config
from vectorsync.sync.worker import Worker

NAME = "latency"
COLUMNS = [f"x{i}" for i in range(8)]
SPEC = f"""
[[embeddings]]
name = "events"
table = "events"
key = "id"
modality = "tabular"
dim = 16
columns = [{", ".join(f'"{c}"' for c in COLUMNS)}]
encoder = {{ type = "autoencoder", seed = 1, epochs = 5 }}
"""


class PollingWorker(Worker):
    """The baseline: the same claim/encode/write path, but it learns of changes by polling."""

    def _wait(self, listener: psycopg.Connection, retry_in: float | None = None) -> None:
        self.stop.wait(self.poll_seconds)


def _load(conn: psycopg.Connection, start: int, count: int) -> None:
    values = ", ".join(f"random() * {i + 1}" for i in range(len(COLUMNS)))
    conn.execute(
        f"INSERT INTO events (id, {', '.join(COLUMNS)}) SELECT g, {values} FROM generate_series(%s::int, %s::int) g",
        (start, start + count - 1),
    )


def _cli(url: str, config: Path, *args: str) -> None:
    code = main_entry(["--config", str(config), "--database-url", url, *args])
    if code != 0:
        raise RuntimeError(f"vectorsync {' '.join(args)} failed with exit code {code}")


def _latencies(
    url: str,
    updates: int,
    rows: int,
    seed: int,
    gap: tuple[float, float] = (0.01, 0.05),
    own: list[float] | None = None,
) -> list[float]:
    """Seconds from each UPDATE's start to the NOTIFY of its committed vector; ``gap`` is the random
    pause before each update (for the poller, a whole interval, so updates do not lock to its phase).
    ``own`` receives each UPDATE's own time (its commit waits for the WAL flush): the part of the
    latency that is the application's statement, not vectorsync's work."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    with psycopg.connect(url, autocommit=True) as writer, psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN vectorsync_bench")
        for _ in range(updates):
            key = int(rng.integers(0, rows))
            time.sleep(float(rng.uniform(*gap)))  # the worker is idle before each change
            started = time.perf_counter()
            writer.execute("UPDATE events SET x0 = x0 + 1 WHERE id = %s", (key,))
            if own is not None:
                own.append(time.perf_counter() - started)
            deadline = started + 30
            while True:
                ready, _, _ = select.select([listener.fileno()], [], [], max(0.0, deadline - time.perf_counter()))
                if not ready:
                    raise RuntimeError(f"no vector for key {key} within 30s")
                payloads = [n.payload for n in listener.notifies(timeout=0)]
                if str(key) in payloads:
                    out.append(time.perf_counter() - started)
                    break
    return out


def _round_trip(url: str, count: int) -> float:
    """Median seconds of one UPDATE + SELECT round trip: the floor any design pays."""
    with psycopg.connect(url, autocommit=True) as conn:
        times = []
        for i in range(count):
            started = time.perf_counter()
            conn.execute("UPDATE events SET x1 = x1 WHERE id = %s", (i,))
            conn.execute("SELECT 1 FROM events_embeddings WHERE id = %s", (i,)).fetchone()
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def _throughput(url: str, seconds: float, rows_per_tx: int, pause: float, first_key: int) -> dict[str, float]:
    stop = threading.Event()
    lags: list[float] = []

    def sample() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                query = "SELECT extract(epoch FROM now() - min(enqueued_at)) FROM vectorsync.pending"
                lag = conn.execute(query).fetchone()[0]
                lags.append(float(lag or 0.0))
                stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    with psycopg.connect(url, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM events_embeddings").fetchone()[0]
        sampler.start()
        started = time.perf_counter()
        inserted, key = 0, first_key
        while time.perf_counter() - started < seconds:
            _load(conn, key, rows_per_tx)
            key += rows_per_tx
            inserted += rows_per_tx
            time.sleep(pause)
        writing = time.perf_counter() - started
        during = conn.execute("SELECT count(*) FROM events_embeddings").fetchone()[0] - before
        while conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0]:
            time.sleep(0.05)
        drained = time.perf_counter() - started
        stop.set()
        sampler.join()
        total = conn.execute("SELECT count(*) FROM events_embeddings").fetchone()[0] - before
    return {
        "insert_rate": inserted / writing,
        "embed_rate_during": during / writing,
        "embed_rate_overall": total / drained,
        "max_lag": max(lags) if lags else 0.0,
        "drain_after_writer": drained - writing,
        "writing": writing,
        "inserted": inserted,
    }


def run(data_dir: Path, quick: bool) -> list[Figure]:
    rows = 2_000 if quick else 10_000
    updates = 100 if quick else 500
    poll_updates = 10 if quick else 40
    write_seconds = 5.0 if quick else 20.0
    with scratch_database(data_dir) as url, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "vectorsync.toml"
        config.write_text(textwrap.dedent(SPEC))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE events (id integer PRIMARY KEY, {', '.join(f'{c} real' for c in COLUMNS)})")
            _load(conn, 0, rows)
        _cli(url, config, "migrate")
        _cli(url, config, "train", "events")
        _cli(url, config, "sync")
        with psycopg.connect(url, autocommit=True) as conn:
            # the target is a view over the generation in service: the trigger goes on that table
            schema, table = conn.execute(
                "SELECT table_schema, table_name FROM vectorsync.generations "
                "WHERE embedding = 'events' AND state = 'serving'"
            ).fetchone()
            conn.execute(
                """
                CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_notify('vectorsync_bench', NEW.id::text); RETURN NULL; END $$;
                """
            )
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION bench_notify()"
                ).format(sql.Identifier(schema, table))
            )
        floor = _round_trip(url, 200)

        # baseline first: a polling worker in this process, 1 s interval
        poller = PollingWorker(url, load_config(config), poll_seconds=1.0)
        thread = threading.Thread(target=poller.run, daemon=True)
        thread.start()
        polled = _latencies(url, poll_updates, rows, seed=1, gap=(0.0, 1.0))
        poller.stop.set()
        thread.join(30)

        env = {**os.environ, "VECTORSYNC_DATABASE_URL": url}
        log = Path(tmp) / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "vectorsync", "--config", str(config), "worker"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )
            try:
                time.sleep(1.0)
                _latencies(url, 5, rows, seed=3)  # warm-up: model load, first batch
                own: list[float] = []
                measured = _latencies(url, updates, rows, seed=2, own=own)
                flow = _throughput(url, write_seconds, rows_per_tx=20, pause=0.02, first_key=rows)
            finally:
                worker.terminate()
                worker.wait(60)
    ms = 1000.0
    p50, p99 = np.percentile(measured, 50) * ms, np.percentile(measured, 99) * ms
    b50, b99 = np.percentile(polled, 50) * ms, np.percentile(polled, 99) * ms
    own50 = np.percentile(own, 50) * ms
    print(
        f"[{NAME}] {updates} updates: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(measured) * ms:.1f} ms; "
        f"the UPDATE's own time p50 {own50:.1f} ms; "
        f"UPDATE+SELECT round trip {floor * ms:.2f} ms; 1 s polling p50 {b50:.0f} ms over {poll_updates}; "
        f"writer {flow['inserted']} rows in {flow['writing']:.1f}s, drained {flow['drain_after_writer']:.2f}s after",
        file=sys.stderr,
    )
    return [
        Figure(NAME, f"change->vector p50 ({updates} updates, idle worker)", p50, "ms",
               "same worker polling every 1 s", b50, "<= 100 ms"),
        Figure(NAME, f"change->vector p99 ({updates} updates, idle worker)", p99, "ms",
               "same worker polling every 1 s", b99, "<= 500 ms"),
        Figure(NAME, "change->vector p50 vs raw round trip", p50, "ms", "UPDATE+SELECT round trip", floor * ms),
        Figure(NAME, "the UPDATE's own time p50 (its commit's WAL flush), within change->vector", own50, "ms",
               "change->vector p50", p50),
        Figure(NAME, "embedded rows/s while a writer inserts", flow["embed_rate_during"], "rows/s",
               "writer's insert rate", flow["insert_rate"], "ratio ~1 (keeps up)"),
        Figure(NAME, "max lag while the writer inserts", flow["max_lag"], "s",
               "writer's run time (lag if no worker)", flow["writing"], "bounded"),
    ]
