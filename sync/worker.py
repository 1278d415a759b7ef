"""Claiming and embedding queued changes: one batch, a one-pass drain, and the long-running worker.

A batch is one transaction: claim queue rows with ``FOR UPDATE SKIP LOCKED`` (and a per-key
advisory lock, so two workers never embed the same key at once), read the source rows, encode,
upsert with binary COPY, and delete the claimed queue rows. A crash anywhere rolls the whole batch
back, so the queue rows become claimable again: nothing is lost, nothing is written twice.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.base import InputError, check_finite
from vectorsync.sync import queue, sink, sources
from vectorsync.sync.catalog import Embedding, load
from vectorsync.sync.db import DatabaseError, connect
from vectorsync.sync.models import ModelCache, current_version, ensure_model
from vectorsync.sync.spec import Config, EmbeddingSpec, GraphEmbeddingSpec, WorkerSpec

log = logging.getLogger("vectorsync.worker")

@dataclass
class BatchResult:
    """What one batch did. ``embedded`` counts rows encoded and written; ``unchanged`` counts claimed
    rows whose vector already came from the current model and the current input values."""

    claimed: int = 0
    embedded: int = 0
    unchanged: int = 0
    failed: int = 0
    retried: int = 0
    deleted: int = 0
    seconds: float = 0.0


@dataclass
class _Claim:
    ids: list[int] = field(default_factory=list)
    attempts: int = 0


def queue_embeddable(spec: EmbeddingSpec) -> bool:
    """Graph embeddings are computed for the whole graph at once, not from the queue."""
    return not isinstance(spec, GraphEmbeddingSpec)


def process_batch(
    conn: psycopg.Connection,
    emb: Embedding,
    cache: ModelCache,
    settings: WorkerSpec,
    batch_size: int,
    *,
    worker_id: str | None = None,
) -> BatchResult | None:
    """Claim and embed one batch in one transaction; None when nothing is claimable.

    With ``worker_id``, that worker's counters in ``vectorsync.workers`` move in the same
    transaction, so they count exactly the work that was committed (a killed batch counts nothing).
    """
    started = time.perf_counter()
    with conn.transaction():
        rows = queue.claim(conn, emb.name, batch_size)
        if not rows:
            return None
        claims: dict[str, _Claim] = {}
        for queue_id, key, attempts in rows:
            claim = claims.setdefault(key, _Claim())
            claim.ids.append(queue_id)
            claim.attempts = max(claim.attempts, attempts)
        version = ensure_model(conn, emb)
        encoder = cache.get(conn, emb, version)

        frame = sources.read_rows(conn, emb, list(claims))
        present = set(frame[sources.KEY])
        gone = [k for k in claims if k not in present]
        result = BatchResult(claimed=len(rows), deleted=sink.delete_keys(conn, emb, gone))
        frame, unchanged = _without_unchanged(conn, emb, frame, version)
        result.unchanged = len(unchanged)

        failures = sources.resolve_references(emb, frame)
        vectors, encode_failures = encode_frame(encoder, frame, failures, emb)
        failures.update(encode_failures)
        ok = np.array([i not in failures for i in range(len(frame))], dtype=bool)
        keys = frame[sources.KEY].tolist()
        hashes = frame[sources.HASH].tolist()
        good_keys = [k for k, good in zip(keys, ok, strict=True) if good]
        sink.upsert(conn, emb, good_keys, vectors[ok], version, [h for h, good in zip(hashes, ok, strict=True) if good])
        result.embedded = len(good_keys)
        queue.forget_failed(conn, emb.name, good_keys)
        for position, error in failures.items():
            key = keys[position]
            if _record_failure(conn, emb, key, claims.pop(key), error, settings):
                result.failed += 1
            else:
                result.retried += 1
        done = [i for claim in claims.values() for i in claim.ids]
        queue.delete_claimed(conn, done)
        if worker_id is not None:
            conn.execute(
                "UPDATE vectorsync.workers SET embedded = embedded + %s, failed = failed + %s WHERE id = %s",
                (result.embedded, result.failed, worker_id),
            )
    result.seconds = time.perf_counter() - started
    return result


def _without_unchanged(
    conn: psycopg.Connection, emb: Embedding, frame: pd.DataFrame, version: int
) -> tuple[pd.DataFrame, list[str]]:
    """Drop rows whose stored vector already comes from ``version`` and the same input values.

    A key queued twice (an insert, then an update processed in another batch) is then encoded once
    per model version and input values. Inputs read from files are always re-encoded: a file can
    change while its path, and so the input hash, stays the same.
    """
    if getattr(emb.spec, "path_column", None) is not None or frame.empty:
        return frame, []
    stored = dict(
        conn.execute(
            sql.SQL(
                "SELECT {key}::text, input_hash FROM {tgt} WHERE {key} = ANY(CAST(%s AS {karr})) "
                "AND model_version = %s AND input_hash IS NOT NULL"
            ).format(key=emb.key, tgt=emb.target, karr=emb.key_array_type),
            (frame[sources.KEY].tolist(), version),
        ).fetchall()
    )
    same = frame[sources.KEY].map(stored).eq(frame[sources.HASH]).to_numpy(dtype=bool)
    return frame[~same].reset_index(drop=True), frame[sources.KEY][same].tolist()


def encode_frame(encoder, frame, failures: dict[int, InputError], emb: Embedding):
    """Encode the rows that resolved; an encoder crash fails those rows, not the worker."""
    dim = emb.spec.dim
    vectors = np.zeros((len(frame), dim), dtype=np.float32)
    good = [i for i in range(len(frame)) if i not in failures]
    if not good:
        return vectors, {}
    subset = frame.iloc[good].reset_index(drop=True)
    try:
        result = encoder.encode(subset)
    except Exception as exc:  # the encoder's bug must not stop the queue: every row of it fails
        message = f"encoder {encoder.type} failed: {type(exc).__name__}: {exc}"
        return vectors, {i: InputError(None, message) for i in good}
    if result.vectors.shape != (len(good), dim):
        message = f"encoder returned shape {result.vectors.shape}, expected ({len(good)}, {dim})"
        return vectors, {i: InputError(None, message) for i in good}
    own = dict(result.failures)
    check_finite(result.vectors, own, None)
    vectors[good] = result.vectors
    return vectors, {good[p]: err for p, err in own.items()}


def _record_failure(
    conn: psycopg.Connection, emb: Embedding, key: str, claim: _Claim, error: InputError, settings: WorkerSpec
) -> bool:
    """Log the error; retry later with backoff, or move the item to vectorsync.failed. True if moved."""
    attempt = claim.attempts + 1
    queue.record_attempt(conn, emb.name, key, error.column, error.message, attempt)
    if attempt >= settings.max_attempts:
        queue.move_to_failed(conn, emb.name, key, error.column, error.message, attempt, claim.ids)
        return True
    queue.schedule_retry(conn, claim.ids, attempt, error.message, settings.backoff_seconds * (2 ** (attempt - 1)))
    return False


def drain(
    conn: psycopg.Connection,
    emb: Embedding,
    settings: WorkerSpec,
    *,
    batch_size: int,
    cache: ModelCache | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> BatchResult:
    """Process the embedding's queue until it is empty, waiting out retry backoffs."""
    cache = cache or ModelCache()
    total = BatchResult()
    while True:
        result = process_batch(conn, emb, cache, settings, batch_size)
        if result is None:
            remaining = queue.seconds_until_ready(conn, emb.name)
            conn.commit()
            if remaining is None:
                return total
            time.sleep(min(max(remaining, 0.05), 5.0))
            continue
        for name in ("claimed", "embedded", "unchanged", "failed", "retried", "deleted", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        if on_batch:
            on_batch(result)


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the database went away (as opposed to one batch failing)."""
    if isinstance(exc, DatabaseError | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        return state == "" or state.startswith(("08", "57P"))  # connection exceptions, server shutdown
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Worker:
    """A long-running worker: LISTEN for changes (slow poll as fallback), embed, heartbeat,
    reconnect after database faults, stop cleanly on SIGTERM/SIGINT."""

    def __init__(
        self,
        url: str,
        config: Config,
        names: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        max_wait_ms: int | None = None,
        poll_seconds: float | None = None,
        thread_index: int = 0,
        metrics: object | None = None,
    ) -> None:
        self.url = url
        self.specs = [s for s in config.select(list(names) if names else None) if queue_embeddable(s)]
        self.settings = config.worker
        self.batch_size = batch_size or config.worker.batch_size
        self.max_wait = (max_wait_ms if max_wait_ms is not None else config.worker.max_wait_ms) / 1000
        self.poll_seconds = poll_seconds or config.worker.poll_seconds
        self.id = f"{socket.gethostname()}:{os.getpid()}:{thread_index}"
        self.stop = threading.Event()
        self.metrics = metrics
        self.embedded = 0
        self.failed = 0
        # one thread per process queues what changed while no worker ran (the first-run backfill)
        self._backfill_pending = thread_index == 0
        self._cache = ModelCache()
        self._conn: psycopg.Connection | None = None
        self._backoff = 0.5
        self._lost_since: float | None = None
        self._served = False  # whether it ever reached the database

    def run(self) -> None:
        """Serve until ``stop`` is set. Every error is handled here: a lost database is logged once
        and retried with backoff until it is back; any other error is logged and retried too."""
        while not self.stop.is_set():
            try:
                self._serve()
            except Exception as exc:
                if self.stop.is_set():
                    break
                if _connection_lost(exc):
                    # a daemon keeps trying, and says at every try what it waits for and until when
                    now = time.monotonic()
                    if self._lost_since is None:
                        self._lost_since = now
                    log.warning(
                        "worker %s has waited %.0fs for the database%s; next try in %.1fs (%s)",
                        self.id, now - self._lost_since, " since losing it" if self._served else "",
                        self._backoff, _one_line(exc),
                    )
                else:
                    log.error(
                        "worker %s: %s: %s; retrying in %.1fs", self.id, type(exc).__name__, _one_line(exc),
                        self._backoff,
                    )
                self.stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, 30.0)
        self._mark_stopped()

    def _serve(self) -> None:
        listener = conn = None
        try:
            conn = self._conn = connect(self.url, autocommit=True)
            listener = connect(self.url, autocommit=True, vector=False)
            queue.listen(listener)
            embeddings = [load(conn, s) for s in self.specs]
            for emb in embeddings:  # load models now: on the first change it cost the first rows a second or more
                version = current_version(conn, emb.name)
                if version is not None:
                    self._cache.get(conn, emb, version)
            self._heartbeat(conn, "running")
            self._served = True
            if self._lost_since is not None:
                log.warning("worker %s reconnected after %.1fs", self.id, time.monotonic() - self._lost_since)
                self._lost_since = None
            self._backoff = 0.5
            if self._backfill_pending:
                for emb in embeddings:
                    self._backfill(conn, emb)
                self._backfill_pending = False
            last_beat = time.monotonic()
            while not self.stop.is_set():
                busy = False
                for emb in embeddings:
                    result = process_batch(conn, emb, self._cache, self.settings, self.batch_size, worker_id=self.id)
                    if result is not None:
                        busy = True
                        self._count(emb, result)
                if time.monotonic() - last_beat > 2.0:
                    self._heartbeat(conn, "running")
                    last_beat = time.monotonic()
                if not busy:
                    self._wait(listener, self._next_retry(conn))
        finally:
            for c in (listener, conn):
                if c is not None:
                    c.close()

    def _backfill(self, conn: psycopg.Connection, emb: Embedding) -> None:
        with conn.transaction():
            queue.lock_backfill(conn, emb.name)
            queued = queue.enqueue_backfill(conn, emb, current_version(conn, emb.name))
        if queued:
            log.info("worker %s queued %d row(s) of %s that changed while no worker ran", self.id, queued, emb.name)

    def _next_retry(self, conn: psycopg.Connection) -> float | None:
        """Seconds until the earliest item in retry backoff becomes claimable, if any."""
        return queue.next_retry(conn, [s.name for s in self.specs])

    def _wait(self, listener: psycopg.Connection, retry_in: float | None = None) -> None:
        """Sleep until a NOTIFY (then linger max_wait to fill the batch), a retry is due, a poll
        tick, or stop."""
        deadline = time.monotonic() + min(self.poll_seconds, retry_in if retry_in is not None else self.poll_seconds)
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([listener.fileno()], [], [], min(remaining, 0.5))
            if ready:
                got = list(listener.notifies(timeout=0))
                if got:
                    if self.max_wait > 0:
                        self.stop.wait(self.max_wait)
                    list(listener.notifies(timeout=0))
                    return
                listener.execute("SELECT 1")  # surfaces a dead connection as OperationalError

    def _count(self, emb: Embedding, result: BatchResult) -> None:
        self.embedded += result.embedded
        self.failed += result.failed
        if self.metrics is not None:
            self.metrics.observe(emb.name, result)  # type: ignore[attr-defined]

    def _heartbeat(self, conn: psycopg.Connection, status: str) -> None:
        """Mark this worker alive; its counters move with each committed batch, not here."""
        conn.execute(
            """
            INSERT INTO vectorsync.workers (id, hostname, pid, embeddings, status)
            VALUES (%s, %s, %s, %s, %s)
            ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), status = EXCLUDED.status,
                embeddings = EXCLUDED.embeddings
            """,
            (self.id, socket.gethostname(), os.getpid(), [s.name for s in self.specs], status),
        )
        if self.metrics is not None:
            self.metrics.queue({s.name: queue.queue_depth(conn, s.name) for s in self.specs})  # type: ignore[attr-defined]

    def _mark_stopped(self) -> None:
        """Best effort, bounded: a database that is down must not hold up the shutdown."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                conn.execute(
                    "UPDATE vectorsync.workers SET status = 'stopped', heartbeat_at = now() WHERE id = %s", (self.id,)
                )
        except psycopg.Error as exc:
            log.debug("worker %s could not record its stop: %s", self.id, _one_line(exc))

    def cancel_current(self) -> None:
        """Abort the in-flight batch (its transaction rolls back, its items become claimable)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe()
