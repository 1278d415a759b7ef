"""Claiming and embedding queued changes: one batch, a one-pass drain, and the long-running worker.

A batch leases its queue items for ``batch_deadline_seconds`` (committed at once), reads the source
rows without locking them, reads referenced files and encodes with no transaction open, then writes
in one short transaction: confirm the lease, lock the rows (``FOR SHARE SKIP LOCKED``), upsert with
binary COPY, delete the done items. A worker that crashes, freezes or loses its network loses its
lease when it expires and another worker takes the items; a write whose lease was taken over is not
made. Nothing is lost, nothing is written twice, and no file read or encoding ever holds a lock.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.base import Encoder, InputError, check_finite
from vectorsync.errors import VectorsyncError
from vectorsync.sync import generations, models, queue, sink, sources
from vectorsync.sync.catalog import Embedding, NotMigrated, broken_reason, fingerprint, load, recorded_inputs
from vectorsync.sync.db import DatabaseError, connect
from vectorsync.sync.models import ModelCache
from vectorsync.sync.spec import Config, EmbeddingSpec, WorkerSpec

if TYPE_CHECKING:  # metrics imports this module
    from vectorsync.sync.metrics import WorkerMetrics

log = logging.getLogger("vectorsync.worker")

@dataclass
class BatchResult:
    """What one batch did. ``embedded`` counts rows encoded and written; ``unchanged`` counts claimed
    rows whose vector already came from the current model and the current input values;
    ``requeued`` counts items handed back without an attempt (row locked or changed meanwhile)."""

    claimed: int = 0
    embedded: int = 0
    unchanged: int = 0
    failed: int = 0
    retried: int = 0
    deleted: int = 0
    requeued: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Target:
    """One live generation a batch writes into: ``emb`` bound to it, its model version and encoder."""

    emb: Embedding
    version: int
    encoder: Encoder
    #: spec column -> the name the model knows it by (input columns renamed since it was trained)
    renames: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What a batch of one embedding reads from the catalogue: the embedding as migrated and its
    live generations with their loaded encoders. A worker keeps it while the catalogue's
    ``fingerprint`` stays the same, so a batch costs one catalogue query instead of a dozen."""

    emb: Embedding
    targets: tuple[Target, ...]
    fingerprint: str | None = None

    @property
    def building(self) -> bool:
        """Whether a new generation with a model is being built (and so needs backfill steps)."""
        return len(self.targets) > 1


def live_targets(conn: psycopg.Connection, emb: Embedding, cache: ModelCache) -> list[Target]:
    """``emb``'s live generations (serving first, then one being built), each with its encoder;
    call inside a transaction (a pretrained encoder's model is registered on first use)."""
    targets = []
    for target in generations.live(conn, emb):
        version = target.current_version or 0
        encoder = cache.get(conn, target, version)
        if encoder.dim != target.spec.dim:
            raise EmbeddingUnavailable(
                emb.name,
                f"model version {version} of embedding {emb.name!r} makes {encoder.dim}-dimensional vectors "
                f"but its generation holds {target.spec.dim}; run `vectorsync migrate` and `vectorsync train`",
            )
        targets.append(Target(target, version, encoder, models.input_renames(conn, target, version, encoder)))
    return targets


def prepare(conn: psycopg.Connection, spec: EmbeddingSpec, cache: ModelCache, fingerprint: str | None = None) -> Plan:
    """The plan of ``spec``'s batches as the catalogue stands; raises ``EmbeddingUnavailable`` when
    schema drift marked the embedding broken, or when ``migrate`` ran with other input columns
    than this process's config names (a worker started before the spec was fixed)."""
    emb = load(conn, spec)
    broken = broken_reason(conn, spec.name)
    if broken is not None:  # marked by the capture's drift detection: no item is at fault
        raise EmbeddingUnavailable(spec.name, f"embedding {spec.name!r} is broken: {broken}")
    recorded = recorded_inputs(conn, spec.name)
    if recorded is not None and recorded != spec.input_columns:
        raise EmbeddingUnavailable(
            spec.name,
            f"embedding {spec.name!r} was migrated to read columns {', '.join(recorded)}, but this process's "
            f"config reads {', '.join(spec.input_columns)}; restart it with the config `vectorsync migrate` used",
        )
    with conn.transaction():
        targets = live_targets(conn, emb, cache)
    return Plan(emb, tuple(targets), fingerprint)


@dataclass
class _Claim:
    ids: list[int] = field(default_factory=list)
    attempts: int = 0


@dataclass
class _Lease:
    """Items leased by one batch: their claims by key, and the token that proves the lease."""

    token: datetime
    claims: dict[str, _Claim]
    deadline: float  # time.monotonic() after which the lease may belong to another worker
    claimed: int = 0  # queue items leased (a key queued twice counts twice)


class EmbeddingUnavailable(VectorsyncError):
    """The embedding as a whole cannot be embedded now (source changed, model unusable, spec out of
    date): no item is at fault, so none is charged an attempt; the worker parks the embedding, and
    a command (``sync``) says why in one line."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


#: Seconds a row locked by the application waits before its item is claimed again.
LOCKED_ROW_DELAY = 1.0
#: In a burst (two or more NOTIFYs already arrived), how long the worker listens for another before it
#: embeds what is queued; a lone change does not wait at all.
BURST_GAP_SECONDS = 0.002
#: Longest pause of a broken embedding before the worker tries it again.
PARK_CAP_SECONDS = 30.0
#: How long a worker serving several embeddings keeps pipelining one before it turns to the others.
FAIR_SHARE_SECONDS = 5.0


def lease_batch(conn: psycopg.Connection, emb: Embedding, settings: WorkerSpec, batch_size: int) -> _Lease | None:
    """Lease up to ``batch_size`` ready items of ``emb`` in a transaction of its own, committed at
    once; None when nothing is claimable."""
    rows = queue.lease(conn, emb, batch_size, settings.batch_deadline_seconds)
    if not rows:
        return None
    claims: dict[str, _Claim] = {}
    for queue_id, key, attempts, _ in rows:
        claim = claims.setdefault(key, _Claim())
        claim.ids.append(queue_id)
        claim.attempts = max(claim.attempts, attempts)
    return _Lease(rows[0][3], claims, time.monotonic() + settings.batch_deadline_seconds, len(rows))


def process_batch(
    conn: psycopg.Connection,
    emb: Embedding,
    cache: ModelCache,
    settings: WorkerSpec,
    batch_size: int,
    *,
    worker_id: str | None = None,
    plan: Plan | None = None,
) -> BatchResult | None:
    """Lease and embed one batch; None when nothing is claimable.

    Three short transactions, none held across file reads or encoding: lease the items, read the
    rows (no row locks), then write: confirm the lease, lock the rows ``FOR SHARE SKIP LOCKED``
    (a row the application holds locked is handed back for later, never waited for), keep only rows
    whose inputs are still the ones encoded, upsert, delete the done items. A batch that fails as a
    whole is split in halves until the failing items are alone; each of those is charged an attempt
    (backoff, then ``vectorsync.failed``), whatever the exception. Raises ``EmbeddingUnavailable``
    when the embedding itself is broken. With ``worker_id``, that worker's counters move in the
    write transaction, so they count exactly the work that was committed. With ``plan``, the live
    generations and encoders are the plan's (the caller checked it is current); otherwise they are
    read in the batch.
    """
    started = time.perf_counter()
    lease = lease_batch(conn, emb, settings, batch_size)
    if lease is None:
        return None
    result = BatchResult(claimed=lease.claimed)
    try:
        _embed_isolating(conn, emb, cache, settings, lease, list(lease.claims), result, worker_id, plan)
    except EmbeddingUnavailable:
        _release(conn, lease, list(lease.claims))
        raise
    result.seconds = time.perf_counter() - started
    return result


def _release(conn: psycopg.Connection, lease: _Lease, keys: Sequence[str], delay: float = 0.0) -> None:
    ids = [i for key in keys for i in lease.claims[key].ids]
    with conn.transaction():
        queue.release(conn, ids, lease.token, delay)


def _embed_isolating(
    conn: psycopg.Connection,
    emb: Embedding,
    cache: ModelCache,
    settings: WorkerSpec,
    lease: _Lease,
    keys: list[str],
    result: BatchResult,
    worker_id: str | None,
    plan: Plan | None,
) -> None:
    """Embed ``keys``; if that fails as a whole, split them until the guilty keys are alone."""
    try:
        _embed(conn, emb, cache, settings, lease, keys, result, worker_id, plan)
    except Exception as exc:
        _isolate(conn, emb, cache, settings, lease, keys, result, worker_id, plan, exc)


def _isolate(
    conn: psycopg.Connection,
    emb: Embedding,
    cache: ModelCache,
    settings: WorkerSpec,
    lease: _Lease,
    keys: list[str],
    result: BatchResult,
    worker_id: str | None,
    plan: Plan | None,
    exc: Exception,
) -> None:
    """Settle ``keys``, whose embedding failed as a whole with ``exc``: raise when the embedding or
    the connection is at fault; otherwise embed the halves apart until the guilty keys are alone,
    and charge each of those an attempt."""
    unavailable = embedding_problem(emb.name, exc)
    if unavailable is not None:
        raise unavailable from exc
    if _connection_lost(exc) or _cancelled(exc) or conn.closed or conn.broken:
        raise exc
    if len(keys) > 1:
        middle = len(keys) // 2
        _embed_isolating(conn, emb, cache, settings, lease, keys[:middle], result, worker_id, plan)
        _embed_isolating(conn, emb, cache, settings, lease, keys[middle:], result, worker_id, plan)
        return
    log.debug("embedding %s, key %s failed alone: %s", emb.name, keys[0], exc, exc_info=exc)
    error = InputError(None, f"{type(exc).__name__}: {_one_line(exc)}")
    with conn.transaction():
        if queue.confirm_lease(conn, lease.claims[keys[0]].ids, lease.token):
            if _record_failure(conn, emb, keys[0], lease.claims[keys[0]], error, settings):
                result.failed += 1
                _count_work(conn, worker_id, 0, 1)
            else:
                result.retried += 1


@dataclass
class _Rows:
    """What a batch read: the source rows, and for each live generation (its target, the rows it
    must encode, the keys whose vector is already current)."""

    read: pd.DataFrame
    generations: list[tuple[Target, pd.DataFrame, list[str]]]


#: A batch's encoded rows, per live generation: (target, model version, frame, unchanged keys,
#: vectors, failures by row).
_Encoded = list[tuple[Embedding, int, pd.DataFrame, list[str], np.ndarray, dict[int, InputError]]]


def _embed(
    conn: psycopg.Connection,
    emb: Embedding,
    cache: ModelCache,
    settings: WorkerSpec,
    lease: _Lease,
    keys: list[str],
    result: BatchResult,
    worker_id: str | None,
    plan: Plan | None,
) -> None:
    """Read, encode and write ``keys`` of ``lease``, into every live generation with its own model
    (sync.generations); per-row problems are recorded, not raised."""
    rows = _read(conn, emb, cache, keys, plan)
    _write(conn, emb, settings, lease, keys, rows, _encode(emb, rows), result, worker_id)


def _read(conn: psycopg.Connection, emb: Embedding, cache: ModelCache, keys: list[str], plan: Plan | None) -> _Rows:
    """The first stage of a batch: read the source rows of ``keys`` (no row locks) and, per live
    generation, drop those whose vector is already current."""
    # with a current plan, the reads need no transaction of their own (two round trips saved)
    with nullcontext() if plan is not None and conn.autocommit else conn.transaction():
        targets = plan.targets if plan is not None else live_targets(conn, emb, cache)
        read, stored = sources.read_rows_and_hashes(
            conn, emb, keys, [(t.emb, t.version) if _keeps_hashes(t.emb) else None for t in targets]
        )
    generations = []
    for live, rows in zip(targets, stored, strict=True):
        # each generation's frame gets its own copy (references are resolved into it)
        frame, unchanged = _without_unchanged(read.copy() if len(targets) > 1 else read, rows)
        generations.append((live, frame, unchanged))
    return _Rows(read, generations)


def _encode(emb: Embedding, rows: _Rows) -> _Encoded:
    """The second stage, with no transaction open: referenced files are read and rows encoded
    lock-free. It touches no connection, so a pipelined worker runs it on a thread of its own."""
    encoded = []
    for live, frame, unchanged in rows.generations:
        target, version = live.emb, live.version
        failures = _duplicate_keys(emb, frame)
        failures.update(sources.resolve_references(target, frame))
        vectors, encode_failures = encode_frame(live.encoder, frame, failures, target, live.renames)
        failures.update(encode_failures)
        encoded.append((target, version, frame, unchanged, vectors, failures))
    return encoded


def _write(
    conn: psycopg.Connection,
    emb: Embedding,
    settings: WorkerSpec,
    lease: _Lease,
    keys: list[str],
    source: _Rows,
    encoded: _Encoded,
    result: BatchResult,
    worker_id: str | None,
) -> None:
    """The last stage, one transaction: confirm the lease, lock the rows, write what is still
    current, charge failures, delete the done queue items."""
    if time.monotonic() > lease.deadline:  # still safe: only rows whose lease is confirmed are written
        log.warning(
            "embedding %s: a batch of %d item(s) took longer than batch_deadline_seconds = %s, so another worker "
            "may take it over; lower batch_size or raise batch_deadline_seconds",
            emb.name, len(keys), settings.batch_deadline_seconds,
        )
    read = source.read
    hashes = dict(zip(read[sources.KEY].tolist(), read[sources.HASH].tolist(), strict=True))
    if _write_current(conn, emb, lease, keys, hashes, encoded, result, worker_id):
        return
    with conn.transaction():
        # rows of keys whose lease is lost are locked too, until this short transaction ends: that
        # saves the round trip of locking after the lease is confirmed
        held, current = queue.confirm_lease_and_lock(
            conn, [i for k in keys for i in lease.claims[k].ids], lease.token, sources.lock_rows_query(emb), keys
        )
        mine = [k for k in keys if any(i in held for i in lease.claims[k].ids)]
        locked = sources.existing_keys(conn, emb, [k for k in mine if k not in current])
        gone = [k for k in mine if k not in current and k not in locked]
        changed = [k for k in mine if k in current and k in hashes and current[k] != hashes[k]]
        queue.release(conn, [i for k in locked for i in lease.claims[k].ids], lease.token, LOCKED_ROW_DELAY)
        queue.release(conn, [i for k in changed for i in lease.claims[k].ids], lease.token)
        result.requeued += len(locked) + len(changed)
        writable = {k for k in mine if k in current and k not in changed}
        # the last generation's upsert of a few rows runs inside finish_batch's statement
        last: tuple[sql.Composable, list[Any]] | None = None
        for position, (target, version, frame, unchanged, vectors, failures) in enumerate(encoded):
            deleted = sink.delete_keys(conn, target, gone)
            frame_keys = frame[sources.KEY].tolist()
            rows = [i for i, k in enumerate(frame_keys) if k in writable and i not in failures]
            good = [frame_keys[i] for i in rows]
            texts = sources.search_texts(target, frame, rows)
            good_hashes = [hashes[k] for k in good]
            if position == len(encoded) - 1 and 0 < len(good) <= sink.SMALL_WRITE:
                last = sink.small_upsert(conn, target, good, vectors[rows], version, good_hashes, texts=texts)
            else:
                sink.upsert(conn, target, good, vectors[rows], version, good_hashes, texts=texts)
            if position == 0:  # what the generation in service got is what the batch reports
                result.deleted += deleted
                result.unchanged += len([k for k in unchanged if k in writable])
                result.embedded += len(good)
                embedded_now = len(good)
        # The last generation is the one that serves next: its failures are charged; a row that only
        # the generation about to retire cannot encode keeps its old vector there until the swap.
        failed_now = 0
        charged: set[str] = set()
        for position, error in failures.items():
            key = frame_keys[position]
            if key not in writable or key in charged:
                continue
            charged.add(key)
            if _record_failure(conn, emb, key, lease.claims[key], error, settings):
                failed_now += 1
            else:
                result.retried += 1
        result.failed += failed_now
        done = [i for k in mine if k in writable and k not in charged for i in lease.claims[k].ids]
        done += [i for k in gone for i in lease.claims[k].ids]
        # a row that embedded, or is gone, is no failed item any more
        queue.finish_batch(
            conn, emb.name, [*good, *gone], [i for i in done if i in held], worker_id, embedded_now, failed_now,
            write=last,
        )


def _write_current(
    conn: psycopg.Connection,
    emb: Embedding,
    lease: _Lease,
    keys: list[str],
    hashes: dict[str, str],
    encoded: _Encoded,
    result: BatchResult,
    worker_id: str | None,
) -> bool:
    """The write of a lone change, or of a few: in one statement, when the batch is whole (one
    generation, every key read and encoded, none unchanged or failed) and still current (leases held,
    rows unlocked and unchanged; see ``queue.finish_current``). False when it wrote nothing: the
    caller's transaction then settles the batch key by key."""
    if len(encoded) != 1:
        return False
    target, version, frame, unchanged, vectors, failures = encoded[0]
    frame_keys = frame[sources.KEY].tolist()
    if failures or unchanged or len(frame_keys) > sink.SMALL_WRITE or sorted(frame_keys) != sorted(keys):
        return False
    texts = sources.search_texts(target, frame, list(range(len(frame_keys))))
    write = sink.small_upsert(
        conn, target, frame_keys, vectors, version, [hashes[k] for k in frame_keys], texts=texts,
        when=queue.BATCH_CURRENT,
    )
    ids = [i for k in keys for i in lease.claims[k].ids]
    expected = {k: hashes[k] for k in frame_keys}
    # on an autocommit session (a worker's) the statement is its own transaction
    with nullcontext() if conn.autocommit else conn.transaction():
        written = queue.finish_current(
            conn, emb.name, ids, lease.token, sources.lock_rows_query(emb), expected, write, worker_id
        )
    if not written:
        return False
    result.embedded += len(frame_keys)
    return True


def _count_work(conn: psycopg.Connection, worker_id: str | None, embedded: int, failed: int) -> None:
    if worker_id is not None and (embedded or failed):
        conn.execute(
            "UPDATE vectorsync.workers SET embedded = embedded + %s, failed = failed + %s WHERE id = %s",
            (embedded, failed, worker_id),
        )


def _duplicate_keys(emb: Embedding, frame: pd.DataFrame) -> dict[int, InputError]:
    """Rows whose key matches more than one source row: the key column is not unique."""
    keys = frame[sources.KEY].tolist()
    if len(set(keys)) == len(keys):  # the usual case, without pandas' per-call overhead
        return {}
    counts = frame[sources.KEY].value_counts()
    repeated = set(counts[counts > 1].index)
    return {
        i: InputError(
            emb.spec.key,
            f"key {key!r} matches {counts[key]} rows of table {emb.spec.table!r}; the key column must be unique",
        )
        for i, key in enumerate(frame[sources.KEY].tolist())
        if key in repeated
    }


def embedding_problem(name: str, exc: BaseException) -> EmbeddingUnavailable | None:
    """``exc`` as an ``EmbeddingUnavailable`` when it is the embedding's fault, not an item's.

    A source table or column that is gone or changed type (SQLSTATE class 42: undefined column,
    operator mismatch after a key type change, missing privilege), an unusable or missing model,
    an out-of-date spec or a dimension mismatch with the target (pgvector's "expected N
    dimensions") would fail every item alike: charging them attempts would only move good rows
    to ``vectorsync.failed``.
    """
    if isinstance(exc, EmbeddingUnavailable):
        return exc
    if isinstance(exc, VectorsyncError) and not isinstance(exc, InputError):
        hint = f"; {exc.hint}" if exc.hint else ""
        return EmbeddingUnavailable(name, _one_line(exc) + hint)
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        if state.startswith(("42", "3F")):
            return EmbeddingUnavailable(
                name,
                f"embedding {name!r} cannot read or write its tables ({_one_line(exc)}); the schema changed "
                "since `vectorsync migrate`: update the spec if needed and run `vectorsync migrate`",
            )
        if state == "22000" and "dimensions" in str(exc):
            return EmbeddingUnavailable(
                name,
                f"embedding {name!r}: {_one_line(exc)}; the target's dim changed under this worker: "
                "restart it with the current config",
            )
    return None


def _cancelled(exc: BaseException) -> bool:
    """A statement cancelled on request (shutdown), as opposed to one hitting its timeout."""
    return isinstance(exc, psycopg.errors.QueryCanceled) and "user request" in str(exc)


def backfill_generation(conn: psycopg.Connection, emb: Embedding, cache: ModelCache, batch_size: int) -> int | None:
    """Embed the next ``batch_size`` source rows (in key order) into the generation being built, in
    one transaction, never replacing a vector a worker wrote there (it is fresher); rows that fail
    go to the queue, whose retries record them. Returns the rows read (0 when the backfill just
    finished), or None when there is nothing to backfill or another process is at it."""
    with conn.transaction():
        if not generations.try_lock(conn, emb.name, transaction=True):
            return None
        gen = generations.building(conn, emb.name)
        if gen is not None and gen.model_version is None:
            gen = generations.with_pretrained_model(conn, emb, gen)
        if gen is None or gen.backfill_done or gen.model_version is None:
            return None
        keys = generations.next_keys(conn, emb, gen, batch_size)
        if not keys:
            generations.mark_backfilled(conn, gen, None)
            return 0
        target = generations.bind(emb, gen)
        todo = generations.absent(conn, target, keys)
        if todo:
            frame = sources.read_rows(conn, emb, todo)
            failures = _duplicate_keys(emb, frame)
            failures.update(sources.resolve_references(target, frame))
            encoder = cache.get(conn, target, gen.model_version)
            renames = models.input_renames(conn, target, gen.model_version, encoder)
            vectors, encode_failures = encode_frame(encoder, frame, failures, target, renames)
            failures.update(encode_failures)
            frame_keys = frame[sources.KEY].tolist()
            frame_hashes = frame[sources.HASH].tolist()
            rows = [i for i in range(len(frame_keys)) if i not in failures]
            sink.upsert(
                conn,
                target,
                [frame_keys[i] for i in rows],
                vectors[rows],
                gen.model_version,
                [frame_hashes[i] for i in rows],
                texts=sources.search_texts(target, frame, rows),
                only_older=True,
            )
            if failures:
                queue.enqueue_keys(conn, emb.name, sorted({frame_keys[i] for i in failures}))
                queue.notify(conn, emb.name)
        generations.mark_backfilled(conn, gen, keys[-1])
        return len(keys)


def advance_generation(conn: psycopg.Connection, emb: Embedding, cache: ModelCache, batch_size: int) -> bool:
    """One step of building ``emb``'s new generation: a backfill batch or, once the backfill is done
    and no source row is missing, its index and the swap. True when it did something. A worker
    running as the least-privilege worker role (no right to write the catalogue) only keeps both
    generations fresh; the owner's `vectorsync sync` builds and swaps."""
    if not generations.may_build(conn):
        return False
    if backfill_generation(conn, emb, cache, batch_size):
        return True
    gen = generations.building(conn, emb.name)
    if gen is None or not gen.backfill_done or gen.model_version is None or generations.missing(conn, emb, gen):
        return False
    if not generations.try_lock(conn, emb.name):
        return False
    try:
        generations.build_index(conn, emb, gen)
        swapped = generations.swap(conn, emb, expect=gen.generation)
    except generations.GenerationError as exc:
        log.info("embedding %s: generation %d cannot be swapped in yet: %s", emb.name, gen.generation, exc)
        return False
    finally:
        generations.unlock(conn, emb.name)
    log.warning(
        "embedding %s: generation %d (model version %s) is now in service",
        emb.name,
        swapped.generation,
        swapped.model_version,
    )
    return True


def _keeps_hashes(emb: Embedding) -> bool:
    """Whether a row whose stored input hash matches is left as it is. Not where every row is
    encoded anyway: inputs read from files are always re-encoded (a file can change while its path,
    and so the input hash, stays the same), and a graph node's vector also depends on its
    neighbours, which its input hash does not cover. A row whose keyword column migrate just made
    is embedded again too: that fills it (``read_rows_and_hashes`` reads no hash for it)."""
    return getattr(emb.spec, "path_column", None) is None and emb.spec.modality != "graph"


def _without_unchanged(frame: pd.DataFrame, stored: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """Drop rows whose stored vector already comes from the same model version and the same input
    values (``stored``: input hash by key, from ``sources.read_rows_and_hashes``).

    A key queued twice (an insert, then an update processed in another batch) is then encoded once
    per model version and input values.
    """
    if not stored or frame.empty:
        return frame, []
    keys, hashes = frame[sources.KEY].tolist(), frame[sources.HASH].tolist()
    same = [stored.get(k) == h for k, h in zip(keys, hashes, strict=True)]
    if not any(same):  # the usual case for a real change: nothing to drop, no copy
        return frame, []
    return frame[~np.array(same)].reset_index(drop=True), [k for k, s in zip(keys, same, strict=True) if s]


def encode_frame(
    encoder: Encoder,
    frame: pd.DataFrame,
    failures: dict[int, InputError],
    emb: Embedding,
    renames: dict[str, str] | None = None,
) -> tuple[np.ndarray, dict[int, InputError]]:
    """Encode the rows that resolved, their columns given the names the model knows them by
    (``renames``, from ``models.input_renames``). An encoder that raises (MemoryError included)
    is retried on halves of the rows until the rows that make it fail are alone: only those fail."""
    vectors = np.zeros((len(frame), emb.spec.dim), dtype=np.float32)
    good = [i for i in range(len(frame)) if i not in failures]
    found: dict[int, InputError] = {}
    if good:
        inputs = frame.rename(columns=renames) if renames else frame
        encoder.wait_loaded()
        if not _first_encode:
            _first_encode.append(seconds_since_start())
        _encode_rows(encoder, inputs, good, emb.spec.dim, vectors, found)
    return vectors, found


#: Seconds from the start of this process to the start of its first encoding (model loaded, batch read).
_first_encode: list[float] = []


def first_encode_seconds() -> float | None:
    """When this process's first batch began encoding, in seconds since the process started."""
    return _first_encode[0] if _first_encode else None


def _encode_rows(
    encoder: Encoder, frame: pd.DataFrame, rows: list[int], dim: int, vectors: np.ndarray, found: dict[int, InputError]
) -> None:
    # a frame that is all good rows (a lone change) goes as it is: pandas' copy costs more than the model
    subset = frame if len(rows) == len(frame) else frame.iloc[rows].reset_index(drop=True)
    try:
        result = encoder.encode(subset)
        if result.vectors.shape != (len(rows), dim):
            raise ValueError(f"encoder returned shape {result.vectors.shape}, expected ({len(rows)}, {dim})")
    except Exception as exc:  # the encoder's failure must not stop the queue, nor fail innocent rows
        if len(rows) > 1:
            middle = len(rows) // 2
            _encode_rows(encoder, frame, rows[:middle], dim, vectors, found)
            _encode_rows(encoder, frame, rows[middle:], dim, vectors, found)
        else:
            found[rows[0]] = InputError(None, f"encoder {encoder.type} failed: {type(exc).__name__}: {_one_line(exc)}")
        return
    own = dict(result.failures)
    check_finite(result.vectors, own, None)
    vectors[rows] = result.vectors
    found.update({rows[p]: err for p, err in own.items()})


def _record_failure(
    conn: psycopg.Connection, emb: Embedding, key: str, claim: _Claim, error: InputError, settings: WorkerSpec
) -> bool:
    """Log the error; retry later with backoff, or move the item to vectorsync.failed. True if moved."""
    attempt = claim.attempts + 1
    queue.record_attempt(conn, emb.name, key, error.column, error.message, attempt)
    if attempt >= settings.max_attempts:
        queue.move_to_failed(conn, emb.name, key, error.column, error.message, attempt, claim.ids)
        return True
    queue.schedule_retry(conn, claim.ids, attempt, error.message, retry_delay(settings, attempt))
    return False


def retry_delay(settings: WorkerSpec, attempt: int) -> float:
    """Exponential backoff per item, capped at ``max_backoff_seconds``, jittered by up to +25% so
    items that failed together do not retry together."""
    delay = min(settings.backoff_seconds * 2 ** (attempt - 1), settings.max_backoff_seconds)
    return delay * (1 + 0.25 * random.random())


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
        for name in ("claimed", "embedded", "unchanged", "failed", "retried", "deleted", "requeued", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        if on_batch:
            on_batch(result)


def seconds_since_start() -> float:
    """Seconds since this process started: what a user waits from launching a command."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the database went away (as opposed to one batch failing)."""
    if isinstance(exc, NotMigrated):
        return False
    if isinstance(exc, DatabaseError | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        # connection exceptions, server shutdown, the session ended for idling in a transaction
        return state == "" or state.startswith(("08", "57P", "25P03"))
    return False


def _embedding_level(name: str, exc: BaseException) -> EmbeddingUnavailable | None:
    """What the worker loop does with an error out of one embedding's batch: None (reconnect or stop)
    for a lost connection or a shutdown; otherwise the embedding is paused, whatever the error."""
    problem = embedding_problem(name, exc)
    if problem is not None:
        return problem
    if _connection_lost(exc) or _cancelled(exc) or not isinstance(exc, Exception):
        return None
    return EmbeddingUnavailable(name, f"{type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: libpq settings of a worker's connections: a peer that vanishes without closing the connection
#: (machine gone, network cut) is noticed within about 30 s instead of the kernel's hours.
KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


@dataclass
class _Batch:
    """One batch on its way through a worker's pipeline: leased, read, encoded, written."""

    plan: Plan
    lease: _Lease
    started: float
    result: BatchResult
    rows: _Rows | None = None
    encoded: _Encoded | None = None
    error: Exception | None = None  # of the read or the encoding: the write stage settles it
    encoding: Future[None] | None = None


def _encode_batch(batch: _Batch) -> None:
    """A batch's encoding stage (on the worker's encoder thread when pipelined): an error is kept."""
    if batch.error is not None or batch.rows is None:
        return
    try:
        batch.encoded = _encode(batch.plan.emb, batch.rows)
    except Exception as exc:
        batch.error = exc


@dataclass
class _Parked:
    """An embedding this worker stopped serving for a while, and why."""

    times: int
    until: float
    reason: str


class Worker:
    """A long-running worker: LISTEN for changes (slow poll as fallback), embed, heartbeat,
    reconnect after database faults, stop cleanly on SIGTERM/SIGINT.

    Errors are handled at three levels. An item's error is charged to that item (``process_batch``).
    An embedding's error (its table changed, its model is unusable) parks that embedding with a
    growing, jittered backoff and records it in ``vectorsync.errors``; the other embeddings go on.
    Only a lost connection reconnects: a worker in an error loop keeps its sessions.
    """

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
        metrics: WorkerMetrics | None = None,
        on_first_batch: Callable[[float], None] | None = None,
    ) -> None:
        self.url = url
        self.specs = [s for s in config.select(list(names) if names else None) if s.from_queue]
        self.settings = config.worker
        self.batch_size = batch_size or config.worker.batch_size
        self.max_wait = (max_wait_ms if max_wait_ms is not None else config.worker.max_wait_ms) / 1000
        self.poll_seconds = poll_seconds or config.worker.poll_seconds
        self.id = f"{socket.gethostname()}:{os.getpid()}:{thread_index}"
        self.stop = threading.Event()
        self.metrics = metrics
        #: called once, with the seconds since the process started, when the first batch is written
        self._on_first_batch = on_first_batch
        self.embedded = 0
        self.failed = 0
        # one thread per process queues what changed while no worker ran (the first-run backfill)
        self._backfill_pending = {s.name for s in self.specs} if thread_index == 0 else set()
        self._cache = ModelCache()
        self._plans: dict[str, Plan] = {}
        self._conn: psycopg.Connection | None = None
        self._listener: psycopg.Connection | None = None
        #: leases of the batches in flight, handed back when the worker stops or reconnects
        self._held: list[_Lease] = []
        self._encoder_pool: ThreadPoolExecutor | None = None
        self._encoding: Future[None] | None = None
        self._last_beat = time.monotonic()
        self._parked: dict[str, _Parked] = {}
        self._backoff = 0.5
        self._lost_since: float | None = None
        self._served = False  # whether it ever reached the database

    def run(self) -> None:
        """Serve until ``stop`` is set. A lost database is retried with backoff until it is back,
        each try logged; any other error is logged and retried on the same connections."""
        while not self.stop.is_set():
            try:
                self._connect()
                self._serve()
            except Exception as exc:
                if self.stop.is_set():
                    break
                if _connection_lost(exc):
                    self._disconnect()
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
                self.stop.wait(self._backoff * (1 + 0.25 * random.random()))
                self._backoff = min(self._backoff * 2, 30.0)
        self._release_held()
        self._disconnect()
        if self._encoder_pool is not None:
            self._encoder_pool.shutdown()
        self._mark_stopped()

    def _connect(self) -> None:
        """Open the worker's two sessions unless they are open; hand back a lease a lost session held."""
        if self._conn is not None and not self._conn.closed and self._listener is not None:
            return
        self._disconnect()
        conn = self._conn = connect(self.url, autocommit=True, **KEEPALIVE)
        # A session whose worker vanished mid-transaction is ended by the server, releasing its locks;
        # statements get the same bound (a backfill, which may scan a whole table, lifts it locally).
        # Commits do not wait for the WAL flush (4 ms each on a plain disk, most of a lone change's
        # latency): a server crash can only lose a batch whose queue items it also restores, so the
        # work is redone, never lost or doubled.
        deadline_ms = str(int(self.settings.batch_deadline_seconds * 1000))
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
            "set_config('statement_timeout', %s, false), set_config('synchronous_commit', 'off', false)",
            (deadline_ms, deadline_ms),
        )
        self._listener = connect(self.url, autocommit=True, vector=False, **KEEPALIVE)
        queue.listen(self._listener)
        self._heartbeat(conn, "running")
        self._served = True
        self._release_held()
        self._preload(conn)
        if self._lost_since is not None:
            log.warning("worker %s reconnected after %.1fs", self.id, time.monotonic() - self._lost_since)
            self._lost_since = None
        self._backoff = 0.5

    def _preload(self, conn: psycopg.Connection) -> None:
        """Load models now: on the first change it cost the first rows a second or more. An
        embedding that cannot load is left to the serve loop, which pauses and reports it."""
        self._plans.clear()  # a new session may follow a restored or replaced database
        for spec in self.specs:
            try:
                self._plan(conn, spec)
            except Exception as exc:
                if _connection_lost(exc):
                    raise
                log.debug("worker %s could not preload the model of %s: %s", self.id, spec.name, exc)

    def _plan(self, conn: psycopg.Connection, spec: EmbeddingSpec) -> Plan:
        """``spec``'s plan, read again whenever the catalogue's fingerprint moved: before every
        batch, one query notices a recreated or re-migrated embedding, a new model or generation,
        a swap or a broken mark that any process committed."""
        current = fingerprint(conn, spec.name)
        plan = self._plans.get(spec.name)
        if plan is None or current is None or plan.fingerprint != current:
            self._plans.pop(spec.name, None)
            plan = self._plans[spec.name] = prepare(conn, spec, self._cache, current)
        return plan

    def _disconnect(self) -> None:
        for attr in ("_listener", "_conn"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                conn.close()

    def _release_held(self) -> None:
        """Best effort: give the batches' leased items back at once instead of at lease expiry."""
        leases, self._held = self._held, []
        conn = self._conn
        if not leases or conn is None or conn.closed:
            return
        try:
            with conn.transaction():
                for lease in leases:
                    queue.release(conn, [i for c in lease.claims.values() for i in c.ids], lease.token)
        except psycopg.Error as exc:
            log.debug("worker %s could not hand back its batches (their leases will expire): %s", self.id, exc)

    def _serve(self) -> None:
        conn, listener = self._conn, self._listener
        assert conn is not None and listener is not None
        while not self.stop.is_set():
            busy = False
            for spec in self.specs:
                if self._is_parked(spec.name):
                    continue
                try:
                    plan = self._plan(conn, spec)
                    emb = plan.emb
                    if spec.name in self._backfill_pending:
                        self._backfill(conn, emb)
                        self._backfill_pending.discard(spec.name)
                    result = self._embed_queued(conn, plan)
                    # changes first; a new generation is built whenever the queue is not full
                    if (
                        plan.building
                        and (result is None or result.claimed < self.batch_size)
                        and advance_generation(conn, emb, self._cache, self.batch_size)
                    ):
                        busy = True
                except Exception as exc:
                    self._plans.pop(spec.name, None)  # read the catalogue afresh after any embedding error
                    problem = _embedding_level(spec.name, exc)
                    if problem is None:
                        raise
                    self._park(conn, problem)
                    continue
                self._parked.pop(spec.name, None)
                busy = busy or result is not None
            self._beat(conn)
            if not busy:
                self._wait(listener, self._next_wake(conn))

    def _embed_queued(self, conn: psycopg.Connection, plan: Plan) -> BatchResult | None:
        """Embed the plan's ready items, batch after batch; returns the last batch's result, None
        when nothing was claimable.

        A batch of fewer than ``batch_size`` items (nothing else was queued: a lone change) is read,
        encoded and written at once, on this thread. Under load the batches overlap: while a thread
        of its own encodes batch N, this one writes batch N-1, then leases and reads batch N+1, so
        the model never waits for the database nor the database for the model. Each batch keeps the
        lease, read and write transactions of ``process_batch`` and every guarantee they give, and
        one that fails is settled as there, with the encoder idle.
        """
        batch = self._lease_batch(conn, plan)
        if batch is None:
            return None
        started = time.monotonic()
        previous: _Batch | None = None
        try:
            while batch is not None:
                ahead = batch.result.claimed >= self.batch_size and batch.error is None
                if ahead:
                    if self._encoder_pool is None:
                        self._encoder_pool = ThreadPoolExecutor(1, thread_name_prefix=f"encode-{self.id}")
                    batch.encoding = self._encoding = self._encoder_pool.submit(_encode_batch, batch)
                else:
                    _encode_batch(batch)
                if previous is not None:
                    self._finish(conn, previous)
                following = self._lease_batch(conn, plan) if ahead and self._lease_ahead(conn, plan, started) else None
                if batch.encoding is not None:
                    batch.encoding.result()  # the stage keeps its own error for the write to settle
                previous, batch = batch, following
            assert previous is not None  # the loop ran at least once
            self._finish(conn, previous)
        except BaseException:
            if not (conn.closed or conn.broken):  # a lost session's leases are handed back on reconnecting
                self._release_held()
            self._wait_encoder()
            raise
        return previous.result

    def _lease_batch(self, conn: psycopg.Connection, plan: Plan) -> _Batch | None:
        """Lease a batch and read its rows; a read error is kept for the batch's write to settle."""
        started = time.perf_counter()
        lease = lease_batch(conn, plan.emb, self.settings, self.batch_size)
        if lease is None:
            return None
        self._held.append(lease)
        batch = _Batch(plan, lease, started, BatchResult(claimed=lease.claimed))
        try:
            batch.rows = _read(conn, plan.emb, self._cache, list(lease.claims), plan)
        except Exception as exc:
            batch.error = exc
        return batch

    def _lease_ahead(self, conn: psycopg.Connection, plan: Plan, started: float) -> bool:
        """Whether to lease the next batch while this one encodes: not when stopping, not past a
        fair share of time when other embeddings wait, and not once the catalogue moved (the serve
        loop reads it afresh)."""
        self._beat(conn)
        if self.stop.is_set() or (len(self.specs) > 1 and time.monotonic() - started > FAIR_SHARE_SECONDS):
            return False
        current = fingerprint(conn, plan.emb.name)
        return current is not None and current == plan.fingerprint

    def _finish(self, conn: psycopg.Connection, batch: _Batch) -> None:
        """Write an encoded batch, or settle one whose read, encoding or write failed as a whole."""
        emb, keys = batch.plan.emb, list(batch.lease.claims)
        error = batch.error
        if error is None:
            assert batch.rows is not None and batch.encoded is not None  # both stages ran without error
            try:
                _write(conn, emb, self.settings, batch.lease, keys, batch.rows, batch.encoded, batch.result, self.id)
            except Exception as exc:
                error = exc
        if error is not None:
            self._wait_encoder()  # the halves are encoded on this thread: one encoder, one thread at a time
            _isolate(conn, emb, self._cache, self.settings, batch.lease, keys, batch.result, self.id, batch.plan, error)
        self._held.remove(batch.lease)
        batch.result.seconds = time.perf_counter() - batch.started
        self._count(emb.name, batch.result)
        if self._on_first_batch is not None:
            self._on_first_batch(seconds_since_start())
            self._on_first_batch = None

    def _wait_encoder(self) -> None:
        if self._encoding is not None:
            wait([self._encoding])
            self._encoding = None

    def _beat(self, conn: psycopg.Connection) -> None:
        if time.monotonic() - self._last_beat > 2.0:
            self._heartbeat(conn, "running")
            self._last_beat = time.monotonic()

    def _is_parked(self, name: str) -> bool:
        parked = self._parked.get(name)
        return parked is not None and time.monotonic() < parked.until

    def _park(self, conn: psycopg.Connection, problem: EmbeddingUnavailable) -> None:
        """Stop serving one embedding for a while (backoff grows per failure, capped, jittered),
        log and record the reason once per change of reason."""
        before = self._parked.get(problem.name)
        times = before.times + 1 if before else 1
        base = max(self.settings.backoff_seconds, 1.0) * 2 ** (times - 1)
        # capped lower than items' backoff: `migrate` or `train` repairs an embedding, and the worker
        # should notice within half a minute; a probe costs one failing statement
        cap = min(max(self.settings.max_backoff_seconds, 1.0), PARK_CAP_SECONDS)
        delay = min(base, cap) * (1 + 0.25 * random.random())
        reason = _one_line(problem)
        self._parked[problem.name] = _Parked(times, time.monotonic() + delay, reason)
        if before is None or before.reason != reason:
            log.error(
                "worker %s paused embedding %s: %s (retrying in %.0fs; other embeddings go on)",
                self.id, problem.name, reason, delay,
            )
            try:
                queue.record_embedding_error(conn, problem.name, reason)
            except psycopg.Error as exc:
                if _connection_lost(exc):
                    raise
                log.debug("worker %s could not record the error of %s: %s", self.id, problem.name, exc)
        else:
            log.debug("embedding %s still unavailable: %s; retrying in %.0fs", problem.name, reason, delay)

    def _backfill(self, conn: psycopg.Connection, emb: Embedding) -> None:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")  # one set-based scan of the table may take long
            queue.lock_backfill(conn, emb.name)
            gen = generations.serving(conn, emb.name)
            queued = queue.enqueue_backfill(conn, generations.bind(emb, gen), gen.model_version) if gen else 0
        if queued:
            log.info("worker %s queued %d row(s) of %s that changed while no worker ran", self.id, queued, emb.name)

    def _next_wake(self, conn: psycopg.Connection) -> float | None:
        """Seconds until an item in retry backoff (of an embedding served now) becomes claimable or
        a paused embedding is retried, if any."""
        active = [s.name for s in self.specs if not self._is_parked(s.name)]
        due = [queue.next_retry(conn, active)] if active else []
        due += [max(p.until - time.monotonic(), 0.01) for p in self._parked.values()]
        known = [d for d in due if d is not None]
        return min(known) if known else None

    def _wait(self, listener: psycopg.Connection, retry_in: float | None = None) -> None:
        """Sleep until a NOTIFY (then gather the burst it starts, see ``_gather``), a retry is due,
        a poll tick, or stop."""
        deadline = time.monotonic() + min(self.poll_seconds, retry_in if retry_in is not None else self.poll_seconds)
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([listener.fileno()], [], [], min(remaining, 0.5))
            if ready:
                got = len(list(listener.notifies(timeout=0)))
                if got:
                    self._gather(listener, got)
                    return
                listener.execute("SELECT 1")  # surfaces a dead connection as OperationalError

    def _gather(self, listener: psycopg.Connection, seen: int) -> None:
        """Linger after a NOTIFY only while further ones keep arriving (each is a committed change),
        at most ``max_wait`` and until a batch's worth came: a lone change is embedded at once, a
        burst of small transactions shares one batch. Under sustained load the serve loop never
        waits at all, and batches fill from the backlog."""
        until = time.monotonic() + self.max_wait
        # a lone change does not even wait one gap: only changes already arrived make it a burst
        burst = seen > 1
        while seen < self.batch_size and not self.stop.is_set():
            gap = min(BURST_GAP_SECONDS if burst else 0.0, until - time.monotonic())
            burst = True
            if gap < 0:
                return
            ready, _, _ = select.select([listener.fileno()], [], [], gap)
            more = len(list(listener.notifies(timeout=0))) if ready else 0
            if not more:
                return
            seen += more

    def _count(self, name: str, result: BatchResult) -> None:
        self.embedded += result.embedded
        self.failed += result.failed
        if self.metrics is not None:
            self.metrics.observe(name, result)

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
            self.metrics.queue({s.name: queue.queue_depth(conn, s.name) for s in self.specs})

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
