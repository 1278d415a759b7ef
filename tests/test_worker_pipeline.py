"""The pipelined worker: under load it encodes one batch while it writes the previous one and leases
the next, and it writes exactly what one batch after another writes, SIGKILL included."""

from __future__ import annotations

import threading

import numpy as np
import psycopg

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
    serving_table,
    wait_until,
    worker_totals,
)
from vectorsync.sync.catalog import load
from vectorsync.sync.models import current_version
from vectorsync.sync.queue import enqueue_backfill
from vectorsync.sync.spec import load_config
from vectorsync.sync.worker import Worker, drain

POISON = ["UPDATE items SET a = 'NaN' WHERE id = 110", "UPDATE items SET b = 'Infinity' WHERE id = 620"]


def leases_in_flight(conn: psycopg.Connection) -> int:
    """Batches holding a live lease (each batch's lease has a token of its own)."""
    return int(scalar(conn, "SELECT count(DISTINCT leased_until) FROM vectorsync.queue WHERE leased_until > now()"))


def test_a_pipelined_worker_killed_mid_run_loses_and_duplicates_nothing(conn, db_url, tmp_path):
    create_items(conn, 400)
    # the killed worker's leases (up to three batches) expire soon, so the restarted worker need not wait long
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=100, deadline=5)
    prepare(db_url, config)
    add_slow_writes(conn, 0.3)
    insert_items(conn, 400, 1600)

    with WorkerProcess(db_url, config, tmp_path / "killed.log") as first:
        # a write in flight while another batch is already leased: the batches overlap
        wait_until(lambda: batch_in_flight(conn) and leases_in_flight(conn) >= 2, 120, "two batches in flight",
                   interval=0.02)
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") >= 300, 120, "some progress")
        wait_until(lambda: batch_in_flight(conn) and leases_in_flight(conn) >= 2, 60, "two batches in flight again",
                   interval=0.02)
        first.kill()
    assert 0 < scalar(conn, "SELECT count(*) FROM items_embeddings") < 2000

    with WorkerProcess(db_url, config, tmp_path / "restarted.log") as second:
        wait_until(lambda: drained(conn, 2000), 240, "the restarted worker to drain the queue")
        assert second.terminate() == 0, second.output()

    # Every batch the killed worker had leased, read, encoded or was writing rolled back or waited
    # out its lease: the work committed counts each row exactly once, and every vector equals a
    # fresh encoding of its row's final values with the stored model.
    assert worker_totals(conn) == (2000, 0)
    assert assert_vectors_match_rows(conn, config) == 2000


def stored(conn: psycopg.Connection) -> dict[int, tuple[np.ndarray, int, str]]:
    return {
        key: (np.array(vector, dtype=np.float32), version, digest)
        for key, vector, version, digest in conn.execute(
            "SELECT id, embedding::real[], model_version, input_hash FROM items_embeddings"
        )
    }


def test_pipelined_batches_write_what_one_batch_after_another_writes(conn, db_url, tmp_path):
    create_items(conn, 1500)
    config = items_spec(tmp_path / "vectorsync.toml", batch_size=100)
    prepare(db_url, config)
    for statement in POISON:
        conn.execute(statement)
    settings = load_config(config)
    emb = load(conn, settings.embedding("items"))
    version = current_version(conn, "items")

    enqueue_backfill(conn, emb, version)
    sequential = drain(conn, emb, settings.worker, batch_size=100)
    one_by_one, failed_one_by_one = stored(conn), set(conn.execute("SELECT key FROM vectorsync.failed"))
    assert (sequential.embedded, sequential.failed) == (1498, 2)

    conn.execute(f"TRUNCATE {serving_table(conn)}")
    conn.execute("DELETE FROM vectorsync.failed")
    enqueue_backfill(conn, emb, version)
    worker = Worker(db_url, settings)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: drained(conn, 1498) and worker.failed == 2, 120, "the worker to drain the queue")
    finally:
        worker.stop.set()
        thread.join(30)
    pipelined = stored(conn)

    assert (worker.embedded, worker.failed) == (sequential.embedded, sequential.failed)
    assert set(conn.execute("SELECT key FROM vectorsync.failed")) == failed_one_by_one
    assert set(pipelined) == set(one_by_one)
    for key, (vector, model, digest) in one_by_one.items():
        assert pipelined[key][1:] == (model, digest)
        np.testing.assert_allclose(pipelined[key][0], vector, atol=1e-6)
