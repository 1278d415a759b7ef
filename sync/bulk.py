"""One-pass sync (``vectorsync sync``): queue what is stale in one statement, drain the queue with
the worker's own batch code, and build the vector index after a large backfill rather than
maintaining it row by row during it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from migrations.operations import index_statement
from sync.catalog import Embedding
from sync.models import ModelCache, current_version
from sync.schema import objects_for
from sync.spec import WorkerSpec
from sync.worker import BatchResult, delete_orphans, drain, enqueue_backfill, queue_depth

#: A backfill at least this large (and at least half the table) drops the index and rebuilds it after.
BULK_THRESHOLD = 10_000


def target_rows(conn: psycopg.Connection, emb: Embedding) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(emb.target)).fetchone()[0]


def _index(emb: Embedding) -> sql.Identifier:
    return sql.Identifier(emb.target_schema, objects_for(emb.spec, emb.source_schema).index_name)


def drop_index(conn: psycopg.Connection, emb: Embedding) -> None:
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(_index(emb)))


def create_index(conn: psycopg.Connection, emb: Embedding) -> None:
    objects = objects_for(emb.spec, emb.source_schema)
    statement = index_statement(objects, rows=target_rows(conn, emb))
    if statement is not None:
        conn.execute(statement)


def rebuild_index(conn: psycopg.Connection, emb: Embedding) -> None:
    drop_index(conn, emb)
    create_index(conn, emb)


def sync_embedding(
    conn: psycopg.Connection,
    emb: Embedding,
    settings: WorkerSpec,
    *,
    batch_size: int,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Bring one embedding up to date; ``conn`` must be in autocommit mode. Returns counts."""
    started = time.perf_counter()
    run_id = conn.execute(
        "INSERT INTO vectorsync.runs (embedding, kind) VALUES (%s, 'sync') RETURNING id", (emb.name,)
    ).fetchone()[0]
    orphans = delete_orphans(conn, emb)
    queued = enqueue_backfill(conn, emb, current_version(conn, emb.name))
    pending = queue_depth(conn, emb.name)
    bulk = pending >= BULK_THRESHOLD and pending * 2 >= target_rows(conn, emb) + pending
    if bulk:
        drop_index(conn, emb)
    done = failed = 0

    def progress(result: BatchResult) -> None:
        nonlocal done, failed
        done += result.claimed
        failed += result.failed
        if on_progress:
            on_progress(done, max(pending, done), failed)

    if on_progress:
        on_progress(0, pending, 0)
    index_seconds = 0.0
    try:
        total = drain(conn, emb, settings, batch_size=batch_size, cache=ModelCache(), on_batch=progress)
    finally:
        if bulk:
            index_started = time.perf_counter()
            create_index(conn, emb)
            index_seconds = time.perf_counter() - index_started
            # fresh statistics, so the planner weighs the index against filters on the new rows
            conn.execute(sql.SQL("ANALYZE {}").format(emb.target))
    conn.execute(
        "UPDATE vectorsync.runs SET finished_at = now(), embedded = %s, failed = %s, deleted = %s WHERE id = %s",
        (total.embedded, total.failed, orphans + total.deleted, run_id),
    )
    conn.execute("UPDATE vectorsync.embeddings SET last_sync = now() WHERE name = %s", (emb.name,))
    return {
        "queued": queued,
        "embedded": total.embedded,
        "failed": total.failed,
        "deleted": orphans + total.deleted,
        "seconds": round(time.perf_counter() - started, 3),
        "index_seconds": round(index_seconds, 3),
    }
