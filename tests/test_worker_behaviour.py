"""What a running worker does with changes, bad rows, TRUNCATE, backfills and new model versions.

These run the worker loop (``sync.worker.Worker``) in a thread of the test process against real
PostgreSQL; process-level faults are in test_worker.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from tests.worker_support import (
    assert_vectors_match_rows,
    create_items,
    drained,
    insert_items,
    items_spec,
    prepare,
    scalar,
    vectorsync,
    wait_until,
    worker_totals,
)
from vectorsync.sync.catalog import fingerprint, load
from vectorsync.sync.queue import enqueue_backfill
from vectorsync.sync.spec import load_config
from vectorsync.sync.worker import Worker


@contextmanager
def running_worker(url: str, config, **options: int) -> Iterator[Worker]:
    worker = Worker(url, load_config(config), **options)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop.set()
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture
def items(conn, db_url, tmp_path):
    """1000 rows, migrated, a trained model; nothing embedded yet."""
    create_items(conn, 1000)
    config = items_spec(tmp_path / "vectorsync.toml", index="none")
    prepare(db_url, config)
    return config


def input_hash(conn: psycopg.Connection, key: int) -> str:
    return scalar(conn, "SELECT md5(ROW(a, b, c, kind, NULL)::text) FROM items WHERE id = %s", (key,))


def stored_hash(conn: psycopg.Connection, key: int) -> str | None:
    row = conn.execute("SELECT input_hash FROM items_embeddings WHERE id = %s", (key,)).fetchone()
    return row[0] if row else None


def stamps(conn: psycopg.Connection) -> dict[int, object]:
    return dict(conn.execute("SELECT id, embedded_at FROM items_embeddings").fetchall())


def test_a_starting_worker_embeds_rows_written_while_none_ran(conn, db_url, items):
    with running_worker(db_url, items):
        wait_until(lambda: drained(conn, 1000), 60, "the first-run backfill to be embedded")
    assert worker_totals(conn) == (1000, 0)
    assert_vectors_match_rows(conn, items)


def test_idle_worker_embeds_a_committed_input_update_soon(conn, db_url, items):
    with running_worker(db_url, items):
        wait_until(lambda: drained(conn, 1000), 60, "the initial rows")
        conn.execute("UPDATE items SET a = a + 100 WHERE id = 42")
        wanted = input_hash(conn, 42)
        wait_until(lambda: stored_hash(conn, 42) == wanted, 30, "the update's new vector")
    assert_vectors_match_rows(conn, items)


def test_a_lone_change_is_embedded_at_once_not_after_max_wait(conn, db_url, items):
    # max_wait only bounds lingering while changes keep arriving: a single change, with nothing
    # after it, is embedded long before these two minutes (the old worker always waited them out)
    with running_worker(db_url, items, max_wait_ms=120_000):
        wait_until(lambda: drained(conn, 1000), 60, "the initial rows")
        conn.execute("UPDATE items SET a = a + 100 WHERE id = 42")
        wanted = input_hash(conn, 42)
        wait_until(lambda: stored_hash(conn, 42) == wanted, 60, "the lone update's vector")


def test_non_input_and_same_value_updates_reembed_nothing(conn, db_url, items):
    with running_worker(db_url, items):
        wait_until(lambda: drained(conn, 1000), 60, "the initial rows")
        before, (work_before, _) = stamps(conn), worker_totals(conn)
        conn.execute("UPDATE items SET note = 'seen' WHERE id < 500")
        conn.execute("UPDATE items SET a = a, kind = kind WHERE id >= 500")
        assert scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 0
        # A later input change: once the worker has embedded it, it has seen everything before it.
        conn.execute("UPDATE items SET c = c + 1 WHERE id = 7")
        wanted = input_hash(conn, 7)
        wait_until(lambda: stored_hash(conn, 7) == wanted, 30, "the sentinel update")
    after = stamps(conn)
    assert [k for k in before if after[k] != before[k]] == [7]
    assert worker_totals(conn)[0] == work_before + 1


POISON = {
    10: ("a", "UPDATE items SET a = 'NaN' WHERE id = 10"),
    20: ("b", "UPDATE items SET b = 'Infinity' WHERE id = 20"),
    30: ("c", "UPDATE items SET c = 'NaN' WHERE id = 30"),
    40: ("b", "UPDATE items SET b = '-Infinity' WHERE id = 40"),
}


def failed_items(conn: psycopg.Connection) -> dict[int, tuple[str, str, int]]:
    rows = conn.execute("SELECT key::int, column_name, error, attempts FROM vectorsync.failed").fetchall()
    return {key: (column, error, attempts) for key, column, error, attempts in rows}


def test_poison_rows_fail_alone_with_backoff_and_retry_embeds_them_once_fixed(conn, db_url, items, cli):
    for _, statement in POISON.values():
        conn.execute(statement)
    with running_worker(db_url, items):
        wait_until(lambda: len(failed_items(conn)) == 4, 60, "the poison rows to reach vectorsync.failed")
        wait_until(lambda: drained(conn, 996), 60, "the good rows")
        failed = failed_items(conn)
        assert {k: v[0] for k, v in failed.items()} == {k: column for k, (column, _) in POISON.items()}
        assert all("not finite" in error and attempts == 3 for _, error, attempts in failed.values())
        attempts = conn.execute(
            "SELECT key::int, array_agg(attempt ORDER BY attempt), "
            "array_agg(extract(epoch FROM occurred_at) ORDER BY attempt) FROM vectorsync.errors GROUP BY key"
        ).fetchall()
        assert {key: numbers for key, numbers, _ in attempts} == {k: [1, 2, 3] for k in POISON}
        for _, _, times in attempts:  # backoff 0.2s then 0.4s (transaction start times)
            assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4

        # Fix two rows without firing the triggers (as a bulk repair might): only `retry` re-queues them.
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("UPDATE items SET a = 1, b = 0.5 WHERE id IN (10, 20)")
        assert scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 0
        result = cli("retry", config=items)
        # retry's own sync races the running worker for the re-queued items: it exits 1 when it is the one
        # that meets the still-bad rows 30 and 40, 0 when the worker took them
        assert result.code in (0, 1) and "re-queued 4 failed item(s)" in result.err
        wait_until(lambda: stored_hash(conn, 10) and stored_hash(conn, 20), 30, "the repaired rows")
        wait_until(lambda: set(failed_items(conn)) == {30, 40}, 30, "the still-bad rows to fail again")

        # An ordinary UPDATE that fixes a row is captured, and the item leaves vectorsync.failed.
        conn.execute("UPDATE items SET c = 2, b = 0.25 WHERE id IN (30, 40)")
        wait_until(lambda: drained(conn, 1000), 30, "the rows fixed by UPDATE")
        wait_until(lambda: not failed_items(conn), 10, "vectorsync.failed to empty")
    assert_vectors_match_rows(conn, items)


def test_truncate_under_a_running_worker_clears_vectors_queue_and_failures(conn, db_url, items):
    conn.execute("UPDATE items SET a = 'NaN' WHERE id = 5")
    with running_worker(db_url, items):
        wait_until(lambda: drained(conn, 999) and failed_items(conn), 60, "the initial rows")
        conn.execute("TRUNCATE items")
        assert scalar(conn, "SELECT count(*) FROM items_embeddings") == 0
        assert scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 0
        assert failed_items(conn) == {}
        insert_items(conn, 5000, 10)
        wait_until(lambda: drained(conn, 10), 30, "rows inserted after the TRUNCATE")


def test_backfill_is_one_set_based_statement_and_a_new_model_queues_nothing(conn, db_url, items):
    config = load_config(items)
    emb = load(conn, config.embedding("items"))
    assert enqueue_backfill(conn, emb, 1) == 1000
    # one statement: every queue row has the same inserting transaction and command id
    assert scalar(conn, "SELECT count(DISTINCT (xmin::text, cmin::text)) FROM vectorsync.queue") == 1
    vectorsync(db_url, items, "sync")
    vectorsync(db_url, items, "train", "items")  # a new model version gets a generation of its own
    assert scalar(conn, "SELECT count(*) FROM vectorsync.pending") == 0
    assert scalar(conn, "SELECT state FROM vectorsync.generations WHERE model_version = 2") == "building"


def test_new_model_version_reembeds_in_background_while_queries_answer(conn, db_url, items):
    vectorsync(db_url, items, "sync")
    with running_worker(db_url, items):
        vectorsync(db_url, items, "train", "items")
        while (models := scalar(conn, "SELECT array_agg(DISTINCT model_version) FROM items_embeddings")) != [2]:
            assert models == [1]  # the old generation, whole, until the new one is swapped in
            assert len(conn.execute("SELECT key FROM vectorsync.nearest('items', '3', 5)").fetchall()) == 5
            assert scalar(conn, "SELECT count(*) FROM items_embeddings") == 1000
        wait_until(lambda: drained(conn, 1000), 30, "the re-embedding")
    assert_vectors_match_rows(conn, items)


def test_the_catalogue_fingerprint_moves_with_every_change_a_batch_relies_on(conn, db_url, items):
    # a running worker reads the catalogue again only when this moves (Worker._plan), once per batch
    seen = [fingerprint(conn, "items")]

    def moves() -> None:
        now = fingerprint(conn, "items")
        assert now is not None and now not in seen
        seen.append(now)

    assert fingerprint(conn, "items") == seen[0]  # steady while nothing changes
    vectorsync(db_url, items, "train", "items")  # a new model version, in a generation being built
    moves()
    conn.execute("UPDATE vectorsync.embeddings SET broken = 'a column was dropped' WHERE name = 'items'")
    moves()
    conn.execute("UPDATE vectorsync.embeddings SET broken = NULL WHERE name = 'items'")
    moves()
    vectorsync(db_url, items, "sync", "items")  # the new generation is swapped in
    moves()
    vectorsync(db_url, items, "migrate", "--recreate", "items")
    moves()
    vectorsync(db_url, items, "train", "items")  # the same version number, other weights
    moves()
    assert fingerprint(conn, "not_an_embedding") is None
