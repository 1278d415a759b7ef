"""A lone change's batch writes in one statement only while it is still current.

Each test runs one batch (``process_batch``) in the test process, on an autocommit session as a
worker's, and makes something happen while the batch encodes: the row changes again, the
application locks it, or another worker takes the lease over. The batch then writes nothing stale
and settles its item as a batch of many would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.worker_support import create_items, items_spec, prepare, scalar, vectorsync
from vectorsync.sync import worker
from vectorsync.sync.catalog import load
from vectorsync.sync.models import ModelCache
from vectorsync.sync.spec import load_config
from vectorsync.sync.worker import BatchResult, process_batch


@pytest.fixture
def items(conn, db_url, tmp_path):
    """100 rows, every one embedded; then row 7 changes (one queued item)."""
    create_items(conn, 100)
    config = items_spec(tmp_path / "vectorsync.toml", index="none")
    prepare(db_url, config)
    vectorsync(db_url, config, "sync")
    conn.execute("UPDATE items SET a = a + 1 WHERE id = 7")
    return config


@pytest.fixture
def while_encoding(monkeypatch) -> Iterator[Callable[[Callable[[], None]], None]]:
    """Run an action once, right after the next batch's encoding, before its write."""

    def arrange(action: Callable[[], None]) -> None:
        encode = worker._encode
        pending = [action]

        def encode_then_act(*args, **kwargs):
            encoded = encode(*args, **kwargs)
            while pending:
                pending.pop()()
            return encoded

        monkeypatch.setattr(worker, "_encode", encode_then_act)

    yield arrange


def one_batch(db_url: str, config, worker_id: str | None = None) -> BatchResult:
    settings = load_config(config)
    with psycopg.connect(db_url, autocommit=True) as session:
        emb = load(session, settings.embedding("items"))
        result = process_batch(session, emb, ModelCache(), settings.worker, 100, worker_id=worker_id)
    assert result is not None
    return result


def input_hash_of(conn: psycopg.Connection, key: int) -> str:
    return scalar(conn, "SELECT md5(ROW(a, b, c, kind, NULL)::text) FROM items WHERE id = %s", (key,))


def stored(conn: psycopg.Connection, key: int) -> str | None:
    row = conn.execute("SELECT input_hash FROM items_embeddings WHERE id = %s", (key,)).fetchone()
    return row[0] if row else None


def queued(conn: psycopg.Connection, key: int) -> int:
    return scalar(conn, "SELECT count(*) FROM vectorsync.pending WHERE key = %s", (str(key),))


def test_a_current_lone_change_is_written_its_item_deleted_and_its_failure_forgotten(conn, db_url, items):
    conn.execute("INSERT INTO vectorsync.failed (embedding, key, error, attempts) VALUES ('items', '7', 'x', 3)")
    conn.execute("INSERT INTO vectorsync.workers (id, hostname, pid, embeddings, status) "
                 "VALUES ('w', 'h', 1, '{items}', 'running')")
    result = one_batch(db_url, items, worker_id="w")
    assert (result.embedded, result.requeued, result.failed) == (1, 0, 0)
    assert stored(conn, 7) == input_hash_of(conn, 7)
    assert queued(conn, 7) == 0
    assert scalar(conn, "SELECT count(*) FROM vectorsync.failed") == 0
    assert scalar(conn, "SELECT embedded FROM vectorsync.workers WHERE id = 'w'") == 1


def test_a_row_changed_again_while_its_batch_encoded_is_not_written_from_the_old_values(
    conn, db_url, items, while_encoding
):
    before = stored(conn, 7)
    while_encoding(lambda: conn.execute("UPDATE items SET a = a + 1 WHERE id = 7"))
    result = one_batch(db_url, items)
    assert (result.embedded, result.requeued) == (0, 1)
    assert stored(conn, 7) == before
    assert queued(conn, 7) >= 1
    one_batch(db_url, items)  # the next batch embeds the current values
    assert stored(conn, 7) == input_hash_of(conn, 7)


def test_a_row_the_application_locked_while_its_batch_encoded_is_handed_back(conn, db_url, items, while_encoding):
    before = stored(conn, 7)
    with psycopg.connect(db_url) as app:
        while_encoding(lambda: app.execute("SELECT 1 FROM items WHERE id = 7 FOR UPDATE"))
        result = one_batch(db_url, items)
        assert (result.embedded, result.requeued) == (0, 1)
    assert stored(conn, 7) == before
    assert queued(conn, 7) == 1


def test_a_batch_whose_lease_another_worker_took_writes_nothing_and_leaves_the_item(
    conn, db_url, items, while_encoding
):
    before = stored(conn, 7)
    taken = "UPDATE vectorsync.queue SET leased_until = leased_until + interval '1 minute' WHERE key = '7'"
    while_encoding(lambda: conn.execute(taken))
    result = one_batch(db_url, items)
    assert (result.embedded, result.requeued, result.deleted) == (0, 0, 0)
    assert stored(conn, 7) == before
    assert queued(conn, 7) == 1


def test_a_queue_row_locked_for_a_moment_by_another_session_is_waited_for_not_left_leased(
    conn, db_url, items, while_encoding
):
    """A concurrent claim whose snapshot predates this batch's lease locks the leased row for a
    moment (``FOR UPDATE SKIP LOCKED`` locks, then rechecks the lease). The write waits for it: a
    write that skipped the row left the item leased, unworked, until its lease expired (4 workers
    on a backlog stalled for a minute at a time)."""
    claimer = psycopg.connect(db_url)
    released = threading.Timer(0.5, claimer.commit)

    def lock_the_queue_row() -> None:
        claimer.execute("SELECT 1 FROM vectorsync.queue WHERE key = '7' FOR UPDATE")
        released.start()

    try:
        while_encoding(lock_the_queue_row)
        result = one_batch(db_url, items)
    finally:
        if released.ident is not None:  # started: the batch reached its write
            released.join()
        claimer.close()
    assert (result.embedded, result.requeued) == (1, 0)
    assert stored(conn, 7) == input_hash_of(conn, 7)
    assert queued(conn, 7) == 0
