"""Scale-out: one backlog of queued changes drained by 1, 2 and 4 worker processes.

Each round queues the same shape of backlog on a tabular embedding: ``ROWS`` inserts in chunks of
100, each chunk followed by an update of half its keys, so a key's two queue entries sit close
together and concurrent workers claim neighbouring batches (the 4-worker test's shape). Then it
starts ``vectorsync worker`` processes and times the drain from the first vector written to an
empty queue, so process start-up is not part of the figure. Changes/s is queue entries settled per
second; the baseline is one worker in the same run.

The drain also reports its longest stall: the longest time the queue held entries and none was
settled. A lease that a batch left unsettled shows up there as a whole ``batch_deadline_seconds``
(the bug fixed by ``queue._HELD`` waiting for a row instead of skipping it).

    python -m benchmarks.run workers [--quick]
    python -m benchmarks.bench_workers --repo /path/to/other/checkout   # another tree's workers
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg

from benchmarks.common import Figure, scratch_database
from vectorsync.sync.cli import main_entry

NAME = "workers"
REPO = Path(__file__).resolve().parent.parent
SPEC = """
[worker]
batch_size = 100

[[embeddings]]
name = "items"
table = "items"
key = "id"
modality = "tabular"
dim = 8
index = "hnsw"
columns = ["a", "b", "c", "kind"]
encoder = { type = "autoencoder", seed = 1, epochs = 3, hidden = [16] }
"""
INSERT = (
    "INSERT INTO items (id, a, b, c, kind) SELECT g, (g %% 97) / 10.0, sin(g), g %% 13, 'k' || (g %% 5) "
    "FROM generate_series(%s::int, %s::int - 1) g"
)


def _scalar(conn: psycopg.Connection, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _queue_backlog(conn: psycopg.Connection, start: int, rows: int) -> int:
    """Insert ``rows`` rows from key ``start`` and update half of them; returns the entries queued."""
    before = _scalar(conn, "SELECT count(*) FROM vectorsync.pending")
    for first in range(start, start + rows, 100):
        conn.execute(INSERT, (first, first + 100))
        conn.execute(
            "UPDATE items SET a = a + 1, kind = 'updated' WHERE id >= %s AND id < %s AND id %% 2 = 0",
            (first, first + 100),
        )
    return _scalar(conn, "SELECT count(*) FROM vectorsync.pending") - before


def _drain(url: str, config: Path, processes: int, repo: Path, logs: Path) -> tuple[float, float]:
    """Start ``processes`` workers, wait for an empty queue; returns (seconds from the first vector
    written to an empty queue, the longest time in between that no queue entry was settled)."""
    env = {**os.environ, "VECTORSYNC_DATABASE_URL": url, "PYTHONPATH": str(repo)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "--config", str(config), "worker"],
            cwd=repo, env=env, stdout=(logs / f"w{processes}-{i}.log").open("wb"), stderr=subprocess.STDOUT,
        )
        for i in range(processes)
    ]
    stall = 0.0
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            embedded = _scalar(conn, "SELECT count(*) FROM items_embeddings")
            deadline = time.monotonic() + 900
            while _scalar(conn, "SELECT count(*) FROM items_embeddings") == embedded:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no vector written; see the logs in {logs}")
                time.sleep(0.02)
            began = last_change = time.perf_counter()
            last = -1
            while True:
                left = _scalar(conn, "SELECT count(*) FROM vectorsync.pending")
                now = time.perf_counter()
                if left != last:
                    last, last_change = left, now
                stall = max(stall, now - last_change)
                if left == 0:
                    return now - began, stall
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the queue did not drain in 15 minutes; see the logs in {logs}")
                time.sleep(0.05)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(60)


def run(data_dir: Path, quick: bool, repo: Path = REPO) -> list[Figure]:
    rows = 4_000 if quick else 20_000
    counts = (1, 2) if quick else (1, 2, 4)
    figures: list[Figure] = []
    with scratch_database(data_dir) as url, tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "vectorsync.toml"
        config.write_text(textwrap.dedent(SPEC))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE items (id integer PRIMARY KEY, a real, b double precision, c numeric, kind text)"
            )
            conn.execute(INSERT, (0, 2000))
            for args in (["migrate"], ["train", "items"], ["sync"]):
                code = main_entry(["--config", str(config), "--database-url", url, *args])
                if code != 0:
                    raise RuntimeError(f"vectorsync {' '.join(args)} exited {code}")
            rates: dict[int, float] = {}
            start = 2000
            for processes in counts:
                queued = _queue_backlog(conn, start, rows)
                start += rows
                seconds, stall = _drain(url, config, processes, repo, Path(scratch))
                rates[processes] = queued / seconds
                print(f"  {processes} worker(s): {queued} entries in {seconds:.1f} s = {rates[processes]:.0f}/s; "
                      f"longest stall {stall:.1f} s", file=sys.stderr)
                figures.append(Figure(
                    NAME, f"changes/s, {processes} worker process(es), {queued:,} queued (tabular, HNSW; "
                    f"drain {seconds:.1f} s, longest stall {stall:.1f} s)",
                    rates[processes], "changes/s", "1 worker process", rates[counts[0]],
                    "≥ 1.0; no drain stalled on a lease",
                ))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose `vectorsync worker` to run")
    parser.add_argument("--data-dir", type=Path, default=Path("benchmarks/results/pg"))
    args = parser.parse_args()
    for figure in run(args.data_dir.resolve(), args.quick, args.repo.resolve()):
        print(figure.line())


if __name__ == "__main__":
    main()
