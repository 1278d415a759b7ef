"""Every statement on ``vectorsync.queue``, ``vectorsync.changes``, ``vectorsync.failed``,
``vectorsync.errors``, ``vectorsync.runs`` and the graph change log ``vectorsync.graph_changes``, and
the one NOTIFY channel.

Capture triggers write one ``vectorsync.changes`` row per statement (its keys as an array), which
costs the application's statement little; ``lease`` spreads those rows into the queue, one row per
key, in its own transaction, so each captured key reaches the queue exactly once.

Workers, the one-pass sync, training, graph runs and the CLI call these small functions instead of
writing queue SQL of their own, so the queue's rules (claim order, leases, backoff, what counts as
failed) live in one place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from vectorsync.migrations.operations import SEARCH_COLUMN
from vectorsync.sync.catalog import Embedding, statement

log = logging.getLogger(__name__)

#: The NOTIFY channel the capture triggers and every enqueue signal on (payload: embedding name).
CHANNEL = "vectorsync"

#: Change rows (one per captured statement) one lease spreads into the queue at most.
SPREAD_ROWS = 1000

#: Moves captured keys into the queue, keeping each key's capture time (and order). A row with
#: NULL keys (a large DELETE) stands for every key whose vector or failed item has no source row
#: any more: one anti-join finds them. ``changes`` has no index (capture pays for none): rows are
#: taken by ctid, in physical order, which is capture order but for reused space.
_SPREAD_FROM = """
WITH taken AS (
    DELETE FROM vectorsync.changes c
     WHERE c.ctid = ANY (ARRAY(SELECT ctid FROM vectorsync.changes WHERE embedding = %(name)s LIMIT %(spread)s
                               FOR UPDATE SKIP LOCKED))
    RETURNING c.keys, c.enqueued_at
), deleted AS (
    SELECT min(t.enqueued_at) AS enqueued_at FROM taken t WHERE t.keys IS NULL HAVING count(*) > 0
)"""
_SPREAD_INSERT = """
INSERT INTO vectorsync.queue (embedding, key, enqueued_at)
SELECT %(name)s, k.key, k.enqueued_at FROM (
    SELECT k.n, k.key, t.enqueued_at FROM taken t, unnest(t.keys) WITH ORDINALITY AS k (key, n)
    UNION ALL
    SELECT 0, g.key, d.enqueued_at FROM deleted d, (
        SELECT v.{key}::text AS key FROM {target} v WHERE NOT EXISTS (SELECT 1 FROM {source} s WHERE s.{key} = v.{key})
        UNION
        SELECT f.key FROM vectorsync.failed f
         WHERE f.embedding = %(name)s AND NOT EXISTS (SELECT 1 FROM {source} s WHERE s.{key}::text = f.key)
    ) g
) k
ORDER BY k.enqueued_at, k.n"""
_SPREAD = _SPREAD_FROM + _SPREAD_INSERT

#: The lease's first statement: spread captured keys (``_SPREAD``), then take ready items, oldest
#: first (an item whose lease expired is ready again), those just spread included (this statement's
#: snapshot cannot see them in the queue, so they come from the INSERT's RETURNING), locked, and kept
#: when their key's advisory lock is free (a key locked by a concurrent lease is left for later).
#: One statement instead of two: a round trip less for a lone change.
_SPREAD_AND_CLAIM = _SPREAD_FROM + """, spread AS (""" + _SPREAD_INSERT + """
    RETURNING id, key
), ready AS (
    SELECT id, key FROM vectorsync.queue
    WHERE embedding = %(name)s AND not_before <= now() AND (leased_until IS NULL OR leased_until <= now())
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
SELECT c.id, c.key FROM (
    SELECT id, key FROM ready UNION ALL SELECT id, key FROM spread ORDER BY id LIMIT %(limit)s
) c
WHERE pg_try_advisory_xact_lock(hashtextextended(%(name)s || ':' || c.key, 0))
"""


def notify(conn: psycopg.Connection, name: str) -> None:
    """Wake the workers serving embedding ``name``."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))


def listen(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))


def lease(conn: psycopg.Connection, emb: Embedding, limit: int, seconds: float) -> list[tuple[int, str, int, datetime]]:
    """Lease up to ``limit`` ready items for ``seconds``, as (id, key, attempts, lease token), in a
    transaction of its own, committed before it returns (call outside any transaction).

    A lease (``leased_until``) keeps other workers off the items while the batch reads files and
    encodes, with no lock held; a worker that dies or freezes loses its items when it expires.
    A key is leased by one batch at a time: a per-key advisory lock serialises concurrent leases,
    and a key with a live lease on another of its queue rows is left for later, so a key queued
    twice is encoded once per input values. The lease's end is its token (``confirm_lease``).

    Two statements between BEGIN and COMMIT: spread captured keys and claim candidates with their
    keys' advisory locks; then lease the candidates whose key has no live lease. The
    live-lease check is a statement of its own so that it sees leases committed before this
    transaction got its advisory locks.
    """
    name = emb.name
    claim = statement(
        ("claim", emb.shape),
        lambda: sql.SQL(_SPREAD_AND_CLAIM).format(key=emb.key, target=emb.target, source=emb.source),
    )
    with conn.transaction():
        candidates = conn.execute(claim, {"name": name, "limit": limit, "spread": SPREAD_ROWS}).fetchall()
        if not candidates:
            return []
        return conn.execute(
            """
            UPDATE vectorsync.queue SET leased_until = statement_timestamp() + make_interval(secs => %(seconds)s)
            WHERE id = ANY(%(ids)s) AND key <> ALL(ARRAY(
                SELECT key FROM vectorsync.queue
                 WHERE embedding = %(name)s AND key = ANY(%(keys)s) AND leased_until > now()))
            RETURNING id, key, attempts, leased_until
            """,
            {"seconds": seconds, "ids": [i for i, _ in candidates], "name": name,
             "keys": sorted({key for _, key in candidates})},
        ).fetchall()


def spread(conn: psycopg.Connection, emb: Embedding, limit: int | None = SPREAD_ROWS) -> int:
    """Move up to ``limit`` captured statements' keys of ``emb`` (all with None) from
    ``vectorsync.changes`` into the queue; returns the number of keys queued. Rows another
    transaction is spreading are skipped, not waited for."""
    query = sql.SQL(_SPREAD).format(key=emb.key, target=emb.target, source=emb.source)
    return conn.execute(query, {"name": emb.name, "spread": limit}).rowcount


#: The leased rows still held under a token (parameters: ids, token), locked. A row locked by
#: another transaction is waited for, not skipped: a concurrent claim whose snapshot predates this
#: lease locks the row for a moment (its ``FOR UPDATE SKIP LOCKED`` locks before it rechecks the
#: lease), and skipping it left the item leased, unworked, until its lease expired. The wait is
#: short and cannot deadlock: claims never wait for a lock, and a writer locks only rows still
#: leased under its own token.
_HELD = sql.SQL("SELECT id FROM vectorsync.queue WHERE id = ANY(%s) AND leased_until = %s ORDER BY id FOR UPDATE")


def confirm_lease(conn: psycopg.Connection, ids: Sequence[int], token: datetime) -> set[int]:
    """Lock the leased rows still held under ``token`` (inside the write transaction); returns their ids.

    Rows whose lease expired and went to another worker, or that were deleted (TRUNCATE), are
    missing: their work is not written twice.
    """
    rows = conn.execute(_HELD, (list(ids), token)).fetchall()
    return {row[0] for row in rows}


def confirm_lease_and_lock(
    conn: psycopg.Connection, ids: Sequence[int], token: datetime, rows: sql.Composable, keys: Sequence[str]
) -> tuple[set[int], dict[str, str]]:
    """``confirm_lease``, and in the same statement the caller's row-locking ``rows`` (a SELECT of
    ``key`` and ``value`` whose one parameter is ``keys``, such as ``sources.lock_rows_query``):
    the ids still held, and ``rows``' values by key. A batch's write makes one round trip less."""
    found = conn.execute(
        sql.SQL(
            """
            WITH held AS ({held}), locked AS ({rows})
            SELECT id, NULL, NULL FROM held UNION ALL SELECT NULL, key, value FROM locked
            """
        ).format(held=_HELD, rows=rows),
        [list(ids), token, list(keys)],
    ).fetchall()
    return {i for i, _, _ in found if i is not None}, {key: value for i, key, value in found if i is None}


def release(conn: psycopg.Connection, ids: Sequence[int], token: datetime, delay: float = 0.0) -> None:
    """Hand leased rows back to the queue, claimable after ``delay`` seconds; counts no attempt."""
    if not ids:  # the common case in a batch's write: a round trip saved is latency saved
        return
    conn.execute(
        "UPDATE vectorsync.queue SET leased_until = NULL, not_before = now() + make_interval(secs => %s) "
        "WHERE id = ANY(%s) AND leased_until = %s",
        (delay, list(ids), token),
    )


def record_embedding_error(conn: psycopg.Connection, name: str, message: str) -> None:
    """Log, in ``vectorsync.errors``, an error of the embedding as a whole (no key)."""
    conn.execute("INSERT INTO vectorsync.errors (embedding, error) VALUES (%s, %s)", (name, message))


def delete_claimed(conn: psycopg.Connection, ids: Sequence[int]) -> None:
    if not ids:
        return
    conn.execute("DELETE FROM vectorsync.queue WHERE id = ANY(%s)", (list(ids),))


def finish_batch(
    conn: psycopg.Connection,
    name: str,
    settled_keys: Sequence[str],
    done_ids: Sequence[int],
    worker_id: str | None = None,
    embedded: int = 0,
    failed: int = 0,
    *,
    write: tuple[sql.Composable, Sequence[Any]] | None = None,
) -> None:
    """The end of a batch's write, in one round trip: forget the failed items of ``settled_keys``
    (rows that now embedded, or are gone), delete the done queue items, and move worker
    ``worker_id``'s counters. ``write``, a statement with positional parameters (the batch's
    ``sink.small_upsert``), runs as part of the same statement."""
    written = sql.SQL("written AS ({}), ").format(write[0]) if write is not None else sql.SQL("")
    conn.execute(
        sql.SQL(
            """
            WITH {written}forgotten AS (
                DELETE FROM vectorsync.failed WHERE embedding = %s AND key = ANY(%s)
            ), counted AS (
                UPDATE vectorsync.workers SET embedded = embedded + %s, failed = failed + %s
                WHERE id = %s AND (%s > 0 OR %s > 0)
            )
            DELETE FROM vectorsync.queue WHERE id = ANY(%s)
            """
        ).format(written=written),
        [*(write[1] if write is not None else ()), name, list(settled_keys), embedded, failed, worker_id,
         embedded, failed, list(done_ids)],
    )


#: The condition under which ``finish_current``'s ``write`` writes: true when the batch is current.
BATCH_CURRENT = sql.SQL("(SELECT current FROM batch)")


def finish_current(
    conn: psycopg.Connection,
    name: str,
    ids: Sequence[int],
    token: datetime,
    rows: sql.Composable,
    expected: dict[str, str],
    write: tuple[sql.Composable, Sequence[Any]],
    worker_id: str | None = None,
) -> bool:
    """A batch's whole write as one statement, made only when the batch is current: every item in
    ``ids`` still leased under ``token``, and ``rows`` (as for ``confirm_lease_and_lock``) finds
    every key of ``expected`` unlocked and with the expected value (the input hash that was
    encoded). Then ``write`` (a statement with positional parameters that writes only under
    ``BATCH_CURRENT``, such as ``sink.small_upsert``'s) runs, the items are deleted, the keys'
    failed items forgotten and worker ``worker_id``'s counter moves by the number of keys.

    Returns whether it was made. One statement needs no transaction opened and committed: a lone
    change's write is one round trip instead of four. When the batch is not current nothing is
    written, and the caller settles it item by item (``finish_batch`` and its companions)."""
    keys = list(expected)
    row = conn.execute(
        sql.SQL(
            """
            WITH held AS ({held}), locked AS ({rows}), batch AS (
                SELECT (SELECT count(*) FROM held) = %s AND (
                    SELECT count(*) FROM locked l JOIN unnest(CAST(%s AS text[]), CAST(%s AS text[])) AS e (key, value)
                    ON e.key = l.key AND e.value = l.value) = %s AS current
            ), written AS ({write}), forgotten AS (
                DELETE FROM vectorsync.failed WHERE embedding = %s AND key = ANY(%s) AND {current}
            ), counted AS (
                UPDATE vectorsync.workers SET embedded = embedded + %s WHERE id = %s AND {current}
            ), done AS (
                DELETE FROM vectorsync.queue WHERE id = ANY(%s) AND {current}
            )
            SELECT {current}
            """
        ).format(held=_HELD, rows=rows, write=write[0], current=BATCH_CURRENT),
        [list(ids), token, keys, len(ids), keys, [expected[k] for k in keys], len(keys), *write[1],
         name, keys, len(keys), worker_id, list(ids)],
    ).fetchone()
    return bool(row and row[0])


def record_attempt(
    conn: psycopg.Connection, name: str, key: str, column: str | None, message: str, attempt: int
) -> None:
    """Log one failed attempt in ``vectorsync.errors``."""
    conn.execute(
        "INSERT INTO vectorsync.errors (embedding, key, column_name, error, attempt) VALUES (%s, %s, %s, %s, %s)",
        (name, key, column, message, attempt),
    )


def move_to_failed(
    conn: psycopg.Connection, name: str, key: str, column: str | None, message: str, attempts: int, ids: Sequence[int]
) -> None:
    """Give up on ``key``: record it in ``vectorsync.failed`` and delete its claimed queue rows."""
    conn.execute(
        "INSERT INTO vectorsync.failed (embedding, key, column_name, error, attempts) VALUES (%s, %s, %s, %s, %s) "
        "ON CONFLICT (embedding, key) DO UPDATE SET column_name = EXCLUDED.column_name, "
        "error = EXCLUDED.error, attempts = EXCLUDED.attempts, failed_at = now()",
        (name, key, column, message, attempts),
    )
    delete_claimed(conn, ids)


def schedule_retry(conn: psycopg.Connection, ids: Sequence[int], attempt: int, message: str, delay: float) -> None:
    """Keep the claimed rows queued, claimable again after ``delay`` seconds."""
    conn.execute(
        "UPDATE vectorsync.queue SET attempts = %s, last_error = %s, leased_until = NULL, "
        "not_before = now() + make_interval(secs => %s) WHERE id = ANY(%s)",
        (attempt, message, delay, list(ids)),
    )


def enqueue_keys(conn: psycopg.Connection, name: str, keys: Sequence[str]) -> None:
    """Queue ``keys`` as they are (duplicates of queued keys included); no NOTIFY."""
    conn.execute("INSERT INTO vectorsync.queue (embedding, key) SELECT %s, unnest(%s::text[])", (name, list(keys)))


def enqueue_without_keywords(conn: psycopg.Connection, emb: Embedding, table: sql.Identifier) -> int:
    """Queue the rows of ``emb``'s generation ``table`` whose keyword column is still empty (it was
    just made, and their text is read from files or bytes), so the workers fill it; returns the
    number queued."""
    cur = conn.execute(
        sql.SQL(
            "INSERT INTO vectorsync.queue (embedding, key) SELECT %s, t.{key}::text FROM {tgt} t "
            "WHERE t.{search} IS NULL"
        ).format(key=emb.key, tgt=table, search=sql.Identifier(SEARCH_COLUMN)),
        (emb.name,),
    )
    return cur.rowcount


def not_failed(emb: Embedding, alias: str) -> sql.Composed:
    """A condition: the source row ``alias`` is not one of ``emb``'s failed items."""
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM vectorsync.failed f WHERE f.embedding = {name} AND f.key = {alias}.{key}::text)"
    ).format(name=sql.Literal(emb.name), alias=sql.Identifier(alias), key=emb.key)


def enqueue_backfill(conn: psycopg.Connection, emb: Embedding, version: int | None) -> int:
    """Queue, in one statement, every row with no vector, an older model version, or changed
    inputs, unless it is already queued (or captured) or failed. Returns the number queued."""
    spread(conn, emb, None)  # captured keys first, so that they are not queued twice
    stale = sql.SQL("t.{key} IS NULL OR t.input_hash IS DISTINCT FROM {hash}").format(
        key=emb.key, hash=emb.input_hash_expr("s")
    )
    if version is not None:
        stale = stale + sql.SQL(" OR t.model_version <> {}").format(sql.Literal(version))
    cur = conn.execute(
        sql.SQL(
            """
            INSERT INTO vectorsync.queue (embedding, key)
            SELECT %(name)s, s.{key}::text FROM {src} s LEFT JOIN {tgt} t ON t.{key} = s.{key}
            WHERE ({stale})
              AND NOT EXISTS (SELECT 1 FROM vectorsync.queue q WHERE q.embedding = %(name)s AND q.key = s.{key}::text)
              AND {not_failed}
            """
        ).format(key=emb.key, src=emb.source, tgt=emb.target, stale=stale, not_failed=not_failed(emb, "s")),
        {"name": emb.name},
    )
    if cur.rowcount:
        notify(conn, emb.name)
    return cur.rowcount


def lock_backfill(conn: psycopg.Connection, name: str) -> None:
    """One backfill of an embedding at a time (workers starting together queue each row once)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('vectorsync.backfill:' || %s, 0))", (name,))


def retry_failed(conn: psycopg.Connection, names: Sequence[str]) -> int:
    """Move the failed items of ``names`` back to the queue; returns how many moved."""
    cur = conn.execute(
        "WITH moved AS (DELETE FROM vectorsync.failed WHERE embedding = ANY(%s) RETURNING embedding, key) "
        "INSERT INTO vectorsync.queue (embedding, key) SELECT embedding, key FROM moved",
        (list(names),),
    )
    for name in names:
        notify(conn, name)
    return cur.rowcount


def failed_items(conn: psycopg.Connection, *, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent failed items: embedding, key, column, reason, attempts, when."""
    rows = conn.execute(
        "SELECT embedding, key, column_name, error, attempts, failed_at FROM vectorsync.failed "
        "ORDER BY failed_at DESC, embedding, key LIMIT %s",
        (limit,),
    ).fetchall()
    names = ("embedding", "key", "column", "error", "attempts", "failed_at")
    return [dict(zip(names, row, strict=True)) for row in rows]


def queue_depth(conn: psycopg.Connection, name: str, *, ready_only: bool = False) -> int:
    """Queued items of ``name``, captured keys not yet spread included (those are always ready)."""
    condition = " AND not_before <= now() AND (leased_until IS NULL OR leased_until <= now())" if ready_only else ""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM vectorsync.queue WHERE embedding = %(name)s" + condition + ") + "
        "(SELECT coalesce(sum(cardinality(keys)), 0) FROM vectorsync.changes WHERE embedding = %(name)s)",
        {"name": name},
    ).fetchone()
    assert row is not None  # a SELECT of one expression returns one row
    return int(row[0])


def seconds_until_ready(conn: psycopg.Connection, name: str) -> float | None:
    """Seconds until the embedding's next queued item is claimable (negative: already); None if empty."""
    row = conn.execute(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM vectorsync.changes WHERE embedding = %(name)s) THEN interval '0' "
        "ELSE (SELECT min(greatest(not_before, leased_until)) - now() FROM vectorsync.queue "
        "WHERE embedding = %(name)s) END",
        {"name": name},
    ).fetchone()
    return None if row is None or row[0] is None else row[0].total_seconds()


def next_retry(conn: psycopg.Connection, names: Sequence[str]) -> float | None:
    """Seconds until the earliest item in retry backoff becomes claimable, if any."""
    row = conn.execute(
        "SELECT extract(epoch FROM min(greatest(not_before, leased_until)) - now()) FROM vectorsync.queue "
        "WHERE embedding = ANY(%s) AND greatest(not_before, leased_until) > now()",
        (list(names),),
    ).fetchone()
    return None if row is None or row[0] is None else max(float(row[0]), 0.01)


def start_run(conn: psycopg.Connection, name: str, kind: str) -> int:
    """Record the start of a sync or graph run in ``vectorsync.runs``; returns its id."""
    row = conn.execute(
        "INSERT INTO vectorsync.runs (embedding, kind) VALUES (%s, %s) RETURNING id", (name, kind)
    ).fetchone()
    assert row is not None  # INSERT ... RETURNING of one row
    return int(row[0])


def finish_run(
    conn: psycopg.Connection,
    run_id: int,
    name: str,
    *,
    embedded: int,
    deleted: int,
    failed: int = 0,
    unchanged: int = 0,
    details: dict[str, Any] | None = None,
) -> None:
    """Record a run's counts and the embedding's last sync time."""
    conn.execute(
        "UPDATE vectorsync.runs SET finished_at = now(), embedded = %s, deleted = %s, failed = %s, unchanged = %s, "
        "details = %s WHERE id = %s",
        (embedded, deleted, failed, unchanged, json.dumps(details or {}, default=str), run_id),
    )
    conn.execute("UPDATE vectorsync.embeddings SET last_sync = now() WHERE name = %s", (name,))


def fail_run(conn: psycopg.Connection, run_id: int, exc: BaseException) -> None:
    """Record why a run stopped, best effort: the original error is the one that matters."""
    try:
        conn.execute(
            "UPDATE vectorsync.runs SET finished_at = now(), details = %s WHERE id = %s",
            (json.dumps({"error": str(exc) or type(exc).__name__}), run_id),
        )
    except psycopg.Error as record_error:  # e.g. the connection itself broke
        log.warning("could not record the failure of run %s: %s", run_id, record_error)


# --- the graph change log: what the node and edge tables' triggers recorded since the last run ---


def graph_changes_pending(conn: psycopg.Connection, name: str) -> bool:
    """Whether a native graph embedding has changes its last run has not seen."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM vectorsync.graph_changes WHERE embedding = %s)", (name,)
    ).fetchone()
    return bool(row and row[0])


def count_graph_changes(conn: psycopg.Connection, name: str, bound: int) -> int:
    """Changes logged since the last run, counted up to ``bound`` (past it the count does not matter)."""
    row = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM vectorsync.graph_changes WHERE embedding = %s LIMIT %s) c", (name, bound)
    ).fetchone()
    return int(row[0]) if row else 0


def graph_changes(conn: psycopg.Connection, name: str) -> list[tuple[Any, ...]]:
    """Every logged change: (kind, source, target, weight); kind is ``edge+``, ``edge-``, ``node`` or ``all``."""
    return conn.execute(
        "SELECT kind, source, target, weight FROM vectorsync.graph_changes WHERE embedding = %s", (name,)
    ).fetchall()


def clear_graph_changes(conn: psycopg.Connection, name: str) -> None:
    """Consume the change log (inside the run's transaction: what its snapshot saw, no more)."""
    conn.execute("DELETE FROM vectorsync.graph_changes WHERE embedding = %s", (name,))
