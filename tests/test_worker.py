"""Workers as real processes against real PostgreSQL: concurrency, SIGKILL, a server restart,
graceful shutdown, and what a running worker reports."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.pg_support import embedded_server, restart
from tests.worker_support import (
    WorkerProcess,
    add_slow_writes,
    assert_vectors_match_rows,
    batch_in_flight,
    create_items,
    drained,
    insert_items,
    items_spec,
    prepare,
    scalar,
    wait_until,
    worker_totals,
)


def test_four_worker_processes_embed_every_change_exactly_once(conn, db_url, tmp_path):
    create_items(conn, 2000)  # written before migrate: no trigger saw them, the workers' backfill must
    # Leases outlast the test: an item left leased by a batch that did not settle it (as a write
    # that skipped a row a concurrent claim locked for a moment once did) is never taken over, and
    # the drain times out instead of merely slowing down.
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=100, deadline=3600)
    prepare(db_url, config)
    # 20k inserts, each chunk followed by an update of half its keys: a key's two queue entries sit
    # close together, so they often land in batches that different workers claim at the same time.
    for start in range(2000, 22000, 100):
        insert_items(conn, start, 100)
        conn.execute("UPDATE items SET a = a + 1, kind = 'updated' WHERE id >= %s AND id < %s AND id %% 2 = 0",
                     (start, start + 100))
    assert scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 30_000

    workers = [WorkerProcess(db_url, config, tmp_path / f"worker{i}.log") for i in range(4)]
    try:
        wait_until(lambda: drained(conn, 22_000), 240, "4 workers to drain 30k queued changes")
        # A second wave while all four run: one update of each of 3143 distinct keys.
        updated = conn.execute("UPDATE items SET b = b + 1 WHERE id % 7 = 0").rowcount
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 0, 120, "the second wave")
    finally:
        codes = [w.terminate() for w in workers]
    assert codes == [0, 0, 0, 0], "\n".join(w.output() for w in workers)

    # Every key was encoded once per input values: once for the first 22k rows (a later queue entry
    # of a key already embedded from its final values is recognised as unchanged), once per update.
    assert worker_totals(conn) == (22_000 + updated, 0)
    assert scalar(conn, "SELECT count(*) FROM vectorsync.workers WHERE embedded > 0") == 4
    assert_vectors_match_rows(conn, config)


def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(conn, db_url, tmp_path):
    create_items(conn, 400)
    # the killed batch's items wait for its lease to expire: 10 s, not the default minute
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=200, index="none", deadline=10)
    prepare(db_url, config)
    add_slow_writes(conn, 0.4)
    insert_items(conn, 400, 2600)

    with WorkerProcess(db_url, config, tmp_path / "killed.log") as first:
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") > 0, 120, "a first batch")
        wait_until(lambda: batch_in_flight(conn), 60, "a batch in flight", interval=0.02)
        first.kill()
    in_target = scalar(conn, "SELECT count(*) FROM items_embeddings")
    assert 0 < in_target < 3000

    with WorkerProcess(db_url, config, tmp_path / "restarted.log") as second:
        wait_until(lambda: drained(conn, 3000), 180, "the restarted worker to drain the queue")
        assert second.terminate() == 0, second.output()

    # The killed batch rolled back, counter included: the work counted is exactly one per row.
    assert worker_totals(conn) == (3000, 0)
    assert_vectors_match_rows(conn, config)


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, so it can be restarted without disturbing others."""
    with embedded_server() as server:
        yield server


def test_worker_recovers_by_itself_from_a_postgres_restart(own_server, tmp_path):
    url = own_server.get_uri()
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=200, index="none")
    with psycopg.connect(url, autocommit=True) as conn:
        create_items(conn, 400)
        prepare(url, config)
        add_slow_writes(conn, 0.25)
        insert_items(conn, 400, 2600)
    with WorkerProcess(url, config, tmp_path / "worker.log") as worker:
        with psycopg.connect(url, autocommit=True) as conn:
            wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") >= 400, 120, "some progress")
        restart(own_server)
        with psycopg.connect(url, autocommit=True) as conn:
            wait_until(lambda: drained(conn, 3000), 180, "the worker to reconnect and drain the queue")
            assert worker.terminate() == 0
            assert worker_totals(conn) == (3000, 0)
            assert_vectors_match_rows(conn, config)
    lost = [line for line in worker.output().splitlines() if "for the database since losing it" in line]
    assert lost, worker.output()
    assert all("next try in" in line for line in lost)  # each try says when the next one comes
    assert "reconnected after" in worker.output()
    assert "Traceback" not in worker.output()


def test_sigterm_mid_batch_stops_within_the_bound_and_releases_the_batch(conn, db_url, tmp_path):
    create_items(conn, 400)
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=200, index="none")
    prepare(db_url, config)
    add_slow_writes(conn, 4.0)  # longer than the shutdown timeout: the batch must be released, not finished
    insert_items(conn, 400, 2600)
    with WorkerProcess(db_url, config, tmp_path / "worker.log", "--shutdown-timeout", "1") as worker:
        wait_until(lambda: batch_in_flight(conn), 120, "a batch in flight", interval=0.02)
        asked = time.monotonic()
        code = worker.terminate(timeout=60)
        took = time.monotonic() - asked
    assert code == 0, worker.output()
    assert took < 1 + 2 + 15, f"stopping took {took:.1f}s"  # shutdown timeout + cancel grace + generous slack
    assert "received SIGTERM" in worker.output()
    assert scalar(conn, "SELECT array_agg(DISTINCT status) FROM vectorsync.workers") == ["stopped"]
    # Nothing claimed was lost: what is not embedded is still queued, and a new worker finishes it.
    embedded_keys = scalar(conn, "SELECT count(*) FROM items_embeddings")
    queued_keys = scalar(conn, "SELECT count(DISTINCT key) FROM vectorsync.pending")
    assert embedded_keys + queued_keys == 3000
    conn.execute("DROP TRIGGER slow_write ON vectorsync.items_g1")
    with WorkerProcess(db_url, config, tmp_path / "again.log") as again:
        wait_until(lambda: drained(conn, 3000), 120, "a new worker to finish the queue")
        again.terminate()
    assert worker_totals(conn) == (3000, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_and_metrics_show_a_running_worker(conn, db_url, tmp_path, cli):
    create_items(conn, 400)
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=100, index="none")
    prepare(db_url, config)
    add_slow_writes(conn, 0.3)
    insert_items(conn, 400, 1600)
    port = free_port()
    with WorkerProcess(db_url, config, tmp_path / "worker.log", "--metrics-port", str(port)) as worker:
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") >= 300, 120, "some progress")
        report = json.loads(cli("status", "--json", config=config).out)
        (row,) = report["embeddings"]
        assert row["pending"] > 0 and row["lag_seconds"] > 0 and row["per_second_1m"] > 0
        assert [w["embeddings"] for w in report["workers"]] == [["items"]]

        def scrape_when_empty() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
            return text if 'vectorsync_queue_depth{embedding="items"} 0.0' in text else None

        wait_until(lambda: drained(conn, 2000), 120, "the queue to drain")
        text = wait_until(scrape_when_empty, 30, "the queue depth gauge to reach 0", interval=0.5)
        assert worker.terminate() == 0
    assert 'vectorsync_embedded_total{embedding="items"} 2000.0' in text
    assert 'vectorsync_failed_total{embedding="items"} 0.0' in text
    assert 'vectorsync_batch_seconds_count{embedding="items"}' in text
    assert 'vectorsync_batch_seconds_bucket{embedding="items",le="+Inf"}' in text
    after = json.loads(cli("status", "--json", config=config).out)
    assert after["workers"] == [] and after["embeddings"][0]["pending"] == 0


def test_status_lists_only_live_workers(conn, db_url, tmp_path, cli):
    create_items(conn, 100)
    config = items_spec(Path(tmp_path / "vectorsync.toml"), index="none")
    prepare(db_url, config)
    conn.execute(
        "INSERT INTO vectorsync.workers (id, hostname, pid, embeddings, heartbeat_at) "
        "VALUES ('gone:1:0', 'gone', 1, '{items}', now() - interval '10 minutes')"
    )
    assert json.loads(cli("status", "--json", config=config).out)["workers"] == []
