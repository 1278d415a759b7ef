"""The bulk path of a one-pass sync, and building the vector index in one go.

A large backfill (no vectors yet, or a new model version; ``service.sync`` decides) streams the
stale rows straight from the source through a server-side cursor, encodes on one thread while the
other writes with binary COPY, and builds the vector index once afterwards rather than maintaining
it row by row. It is safe next to running workers: it only replaces vectors made by an older model
version, the capture triggers keep queueing concurrent changes, and rows that fail are handed to the
queue, whose retry and failed-item handling is the one place errors are dealt with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from queue import Queue
from typing import Any

import psycopg
from psycopg import sql

from vectorsync.migrations.operations import index_statement
from vectorsync.sync import generations, indexing, queue, sink, sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.db import scalar, session_options
from vectorsync.sync.models import ModelCache, input_renames
from vectorsync.sync.progress import Progress
from vectorsync.sync.worker import BatchResult, encode_frame

#: A backfill at least this large (and at least half the table) drops the index and rebuilds it after.
BULK_THRESHOLD = 10_000


def target_rows(conn: psycopg.Connection, emb: Embedding) -> int:
    return int(scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(emb.target)))


def _index(emb: Embedding) -> sql.Identifier:
    return sql.Identifier(emb.target_schema, emb.index_name)


def drop_index(conn: psycopg.Connection, emb: Embedding) -> None:
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(_index(emb)))


def create_index(conn: psycopg.Connection, emb: Embedding) -> None:
    """Build the index in one go with the settings a careful DBA would use (sync.indexing), then
    ANALYZE for the planner."""
    rows = target_rows(conn, emb)
    statement = index_statement(emb, rows=rows)
    if statement is None:
        return
    with conn.transaction():
        for name, value in indexing.build_settings(conn, emb, rows).items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        conn.execute(statement)
    conn.execute(sql.SQL("ANALYZE {}").format(emb.target))


def rebuild_index(conn: psycopg.Connection, emb: Embedding) -> None:
    drop_index(conn, emb)
    create_index(conn, emb)


def _encoded_chunks(url: str, emb: Embedding, version: int, cache: ModelCache, chunk_rows: int) -> Iterator[Any]:
    """Read and encode stale rows on a background thread, two chunks ahead of the writer."""
    handoff: Queue[Any] = Queue(maxsize=2)
    done = object()

    def produce() -> None:
        try:
            with psycopg.connect(url, options=session_options(url)) as reader:
                encoder = cache.get(reader, emb, version)
                renames = input_renames(reader, emb, version, encoder)
                for frame in sources.stream_stale(reader, emb, version, chunk_rows=chunk_rows):
                    failures = sources.resolve_references(emb, frame)
                    vectors, encode_failures = encode_frame(encoder, frame, failures, emb, renames)
                    failures.update(encode_failures)
                    handoff.put((frame, vectors, failures))
            handoff.put(done)
        except BaseException as exc:  # re-raised in the writer's thread
            handoff.put(exc)

    thread = threading.Thread(target=produce, name="vectorsync-bulk-reader", daemon=True)
    thread.start()
    while (item := handoff.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def bulk_load(
    url: str,
    conn: psycopg.Connection,
    emb: Embedding,
    version: int,
    *,
    batch_size: int,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> BatchResult:
    """Embed every row with no vector (or an older model's) straight from the source."""
    total = BatchResult()
    for frame, vectors, failures in _encoded_chunks(url, emb, version, ModelCache(), batch_size):
        started = time.perf_counter()
        keys = frame[sources.KEY].tolist()
        ok = [i not in failures for i in range(len(frame))]
        good = [k for k, g in zip(keys, ok, strict=True) if g]
        hashes = [h for h, g in zip(frame[sources.HASH].tolist(), ok, strict=True) if g]
        texts = sources.search_texts(emb, frame, [i for i, g in enumerate(ok) if g])
        with conn.transaction():
            # No WAL flush per chunk: a chunk lost to a crash only leaves its rows stale, and the
            # next sync (or a starting worker) finds them again. Nothing is dequeued here.
            conn.execute("SET LOCAL synchronous_commit = off")
            sink.upsert(conn, emb, good, vectors[ok], version, hashes, texts=texts, only_older=True)
            if failures:  # the queue retries them and records their errors
                queue.enqueue_keys(conn, emb.name, [keys[i] for i in failures])
        result = BatchResult(
            claimed=len(frame), embedded=len(good), retried=len(failures), seconds=time.perf_counter() - started
        )
        total.claimed += result.claimed
        total.embedded += result.embedded
        total.retried += result.retried
        if on_batch:
            on_batch(result)
    if total.retried:
        queue.notify(conn, emb.name)
    return total


def build_generation(
    url: str,
    conn: psycopg.Connection,
    emb: Embedding,
    *,
    batch_size: int,
    progress: Progress | None = None,
) -> generations.Generation | None:
    """Build the embedding's new generation to the end and swap it in: bulk load from the source,
    index, swap (sync.generations). None when no generation is being built or it has no model."""
    gen = generations.building(conn, emb.name)
    if gen is not None and gen.model_version is None:
        with conn.transaction():
            gen = generations.with_pretrained_model(conn, emb, gen)
    if gen is None or gen.model_version is None:
        return None
    total = sources.count_stale(conn, generations.bind(emb, gen), gen.model_version)
    done = failed = 0

    def on_batch(result: BatchResult) -> None:
        nonlocal done, failed
        done += result.claimed
        failed += result.retried
        if progress is not None:
            progress(done, max(total, done), f"generation {gen.generation}" + (f", failed={failed}" if failed else ""))

    bulk_load(url, conn, generations.bind(emb, gen), gen.model_version, batch_size=batch_size, on_batch=on_batch)
    generations.mark_backfilled(conn, gen, None)
    generations.build_index(conn, emb, gen)
    return generations.swap(conn, emb, expect=gen.generation)
