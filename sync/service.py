"""Migrate, train, sync, retry and inspect embeddings: what the CLI, the demo, the worker daemon, the
examples and the web UI call.

Each function takes the database URL, the validated ``Config`` and embedding names, opens its own
connection, reports long work through a plain ``Progress`` callable and returns a small dataclass.
The two choices every caller used to make for itself are made here, once: whether an embedding is
computed from the whole graph or from the queue (``EmbeddingSpec.from_queue``), and whether a sync
takes the bulk path or the queue path (``_bulk_worthwhile``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.registry import encoder_class
from vectorsync.errors import InputError, SpecError
from vectorsync.sync import bulk, catalog, generations, models, monitor, queue, sink, sources, worker
from vectorsync.sync import train as training
from vectorsync.sync.db import connection
from vectorsync.sync.progress import Progress
from vectorsync.sync.spec import Config, TextSpec

if TYPE_CHECKING:
    from vectorsync.sync import schema

#: Rows per batch of a one-pass sync.
SYNC_BATCH_SIZE = 2048


@dataclass(frozen=True)
class TrainResult:
    name: str
    version: int
    metrics: dict[str, float]
    rows: int
    #: the generation being built with the new model (None: the one in service took it)
    building: int | None = None


@dataclass(frozen=True)
class SyncResult:
    """What one sync of one embedding did. ``path`` is how it ran: ``graph`` (the whole graph
    recomputed), ``bulk`` (streamed from the source, index rebuilt once) or ``queue``."""

    name: str
    path: Literal["graph", "bulk", "queue"]
    embedded: int
    deleted: int
    queued: int = 0
    failed: int = 0
    unchanged: int = 0
    seconds: float = 0.0
    index_seconds: float = 0.0
    #: graph runs: run_id, nodes, edges, skipped_edges, model_version
    details: dict[str, int] = field(default_factory=dict)
    #: the model trained first because the embedding had none
    trained: TrainResult | None = None
    #: the generation this sync built and put in service
    swapped: int | None = None

    def counts(self) -> dict[str, int]:
        """The run's counts, in the order a report lists them."""
        if self.path == "graph":
            return {
                "run_id": self.details.get("run_id", 0),
                "embedded": self.embedded,
                "unchanged": self.unchanged,
                "deleted": self.deleted,
                **{k: v for k, v in self.details.items() if k != "run_id"},
            }
        counts = {"queued": self.queued, "embedded": self.embedded, "failed": self.failed, "deleted": self.deleted}
        return counts | ({"generation": self.swapped} if self.swapped is not None else {})


@dataclass(frozen=True)
class Neighbour:
    key: str
    distance: float


@dataclass(frozen=True)
class HybridHit:
    """One row of a hybrid search: its fused score and its rank on each side (None: not ranked there)."""

    key: str
    score: float
    vector_rank: int | None
    text_rank: int | None


#: Models that encode query texts, loaded once per process; encoders are not re-entrant across threads.
_QUERY_MODELS = models.ModelCache()
_QUERY_LOCK = threading.Lock()


def migrate(url: str, config: Config, *, recreate: Sequence[str] | None = None) -> schema.MigrateReport:
    """Create or update vectorsync's schema and every embedding's table, index and triggers."""
    from vectorsync.sync import schema  # Alembic: seconds of imports that sync and the worker never need

    return schema.upgrade(url, config, recreate=list(recreate) if recreate else None)


def remove(url: str) -> list[str]:
    """Remove everything vectorsync made (the user's tables stay); returns the embeddings dropped."""
    from vectorsync.sync import schema

    return schema.downgrade(url)


def train(
    url: str, config: Config, name: str, *, sample: int | None = None, progress: Progress | None = None
) -> TrainResult:
    """Train embedding ``name``'s encoder on its table's rows, store it as a new model version and
    start the generation that embeds it (queries keep reading the one in service)."""
    spec = config.embedding(name)
    with connection(url, autocommit=True) as conn:
        return _train(url, conn, catalog.load(conn, spec), sample=sample, progress=progress)


def _train(
    url: str, conn: psycopg.Connection, emb: catalog.Embedding, *, sample: int | None, progress: Progress | None
) -> TrainResult:
    def report(step: int, total: int, metrics: dict[str, float]) -> None:
        if progress is not None:
            progress(step, total, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    version, metrics, rows = training.train(url, conn, emb, progress=report, sample=sample)
    gen = generations.building(conn, emb.name)
    building = gen.generation if gen is not None and gen.model_version == version else None
    return TrainResult(emb.name, version, {k: float(v) for k, v in metrics.items()}, rows, building)


def sync(
    url: str,
    config: Config,
    name: str,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> SyncResult:
    """Bring embedding ``name`` up to date: embed every row with no vector from the current model or
    whose inputs changed, remove vectors of deleted rows. A trainable embedding with no model is
    trained first; a graph embedding is recomputed as a whole."""
    spec = config.embedding(name)
    with connection(url, autocommit=True) as conn:
        emb = catalog.load(conn, spec)
        if spec.modality == "graph":  # GraphSAGE too: one forward pass over the whole graph
            from vectorsync.sync import graph  # scipy: imported by graph runs only

            counts = graph.sync_graph(conn, emb, progress=progress)
            return SyncResult(
                name,
                "graph",
                embedded=counts.pop("embedded"),
                unchanged=counts.pop("unchanged"),
                deleted=counts.pop("deleted"),
                details=counts,
            )
        trained = None
        if models.current_version(conn, name) is None and encoder_class(spec.encoder_type).trainable:
            if progress is not None:
                progress(0, None, "no model yet, training one first")
            trained = _train(url, conn, emb, sample=None, progress=progress)
            emb = catalog.load(conn, spec)
        # A generation being built goes first: the model in service may no longer fit the rows (an
        # input column was dropped, say), and what the queue holds then goes to the new one only.
        swapped = bulk.build_generation(url, conn, emb, batch_size=batch_size or SYNC_BATCH_SIZE, progress=progress)
        result = _sync_rows(
            url, conn, emb, config, batch_size=batch_size or SYNC_BATCH_SIZE, progress=progress, trained=trained
        )
        return replace(result, swapped=swapped.generation) if swapped is not None else result


def _bulk_worthwhile(stale: int, existing: int) -> bool:
    """A large backfill (at least half the table) is faster streamed from the source with the index
    dropped and built once after than queued and maintained row by row."""
    return stale >= bulk.BULK_THRESHOLD and stale * 2 >= existing


def _sync_rows(
    url: str,
    conn: psycopg.Connection,
    emb: catalog.Embedding,
    config: Config,
    *,
    batch_size: int,
    progress: Progress | None,
    trained: TrainResult | None,
) -> SyncResult:
    """The bulk path for a large backfill, then the queue path for whatever else is stale. Safe next
    to running workers: the bulk path only replaces vectors of older model versions, the capture
    triggers keep queueing concurrent changes, and rows that fail are handed to the queue."""
    started = time.perf_counter()
    run_id = queue.start_run(conn, emb.name, "sync")
    emb = generations.serving_target(conn, emb)
    version = emb.current_version or 0
    orphans = sink.delete_orphans(conn, emb)
    stale = sources.count_stale(conn, emb, version)
    existing = bulk.target_rows(conn, emb)
    use_bulk = _bulk_worthwhile(stale, existing)
    done = failed = 0
    expected = stale if use_bulk else 0

    def on_batch(result: worker.BatchResult) -> None:
        nonlocal done, failed
        done += result.claimed
        failed += result.failed
        if progress is not None:
            progress(done, max(expected, done), f"failed={failed}" if failed else "")

    index_seconds = 0.0
    loaded = worker.BatchResult()
    if use_bulk:
        bulk.drop_index(conn, emb)
    try:
        if use_bulk:
            if progress is not None:
                progress(0, expected, "")
            loaded = bulk.bulk_load(url, conn, emb, version, batch_size=batch_size, on_batch=on_batch)
        # Rows whose inputs changed while capture was off (e.g. restored with triggers disabled) keep
        # a stale input hash; after a bulk load into an empty table every vector is from this run.
        queued = queue.enqueue_backfill(conn, emb, version) if not use_bulk or existing else 0
        expected = done + queue.queue_depth(conn, emb.name)
        if progress is not None:
            progress(done, expected, f"failed={failed}" if failed else "")
        total = worker.drain(conn, emb, config.worker, batch_size=batch_size, on_batch=on_batch)
    finally:
        if use_bulk:
            index_started = time.perf_counter()
            bulk.create_index(conn, emb)
            index_seconds = time.perf_counter() - index_started
            # fresh statistics, so the planner weighs the index against filters on the new rows
            conn.execute(sql.SQL("ANALYZE {}").format(emb.target))
    if use_bulk:
        orphans += sink.delete_orphans(conn, emb)  # rows deleted while the bulk path read its snapshot
    embedded = loaded.embedded + total.embedded
    deleted = orphans + total.deleted
    queue.finish_run(conn, run_id, emb.name, embedded=embedded, failed=total.failed, deleted=deleted)
    return SyncResult(
        emb.name,
        "bulk" if use_bulk else "queue",
        embedded=embedded,
        deleted=deleted,
        queued=queued + loaded.claimed,
        failed=total.failed,
        unchanged=total.unchanged,
        seconds=round(time.perf_counter() - started, 3),
        index_seconds=round(index_seconds, 3),
        trained=trained,
    )


def retry(url: str, config: Config, names: Sequence[str] | None = None) -> int:
    """Move the failed items of ``names`` (default: every embedding) back to the queue, after their
    rows or files were fixed; returns how many moved."""
    selected = [s.name for s in config.select(list(names) if names else None)]
    with connection(url) as conn:
        count = queue.retry_failed(conn, selected)
        conn.commit()
    return count


def reindex(url: str, config: Config, name: str) -> float:
    """Rebuild embedding ``name``'s vector index with the spec's parameters; returns the seconds taken."""
    spec = config.embedding(name)
    with connection(url, autocommit=True) as conn:
        emb = catalog.load(conn, spec)
        started = time.perf_counter()
        bulk.rebuild_index(conn, generations.serving_target(conn, emb))
    return time.perf_counter() - started


def rollback(url: str, config: Config, name: str) -> tuple[generations.Generation, int]:
    """Put the generation that served before the current one back in service; returns it and the
    rows queued for it (those that changed since it retired)."""
    spec = config.embedding(name)
    with connection(url, autocommit=True) as conn:
        return generations.rollback(conn, catalog.load(conn, spec))


def generations_of(url: str, config: Config, name: str) -> list[dict[str, Any]]:
    """Every generation of ``name``: state, model version, dim, distance, rows, and build progress."""
    config.embedding(name)
    with connection(url, autocommit=True) as conn:
        return generations.progress(conn, name)


def drop_generations(url: str, config: Config, name: str, numbers: Sequence[int] | None = None) -> list[int]:
    """Drop retired generations of ``name`` (the given ones, or all); returns those dropped."""
    config.embedding(name)
    with connection(url, autocommit=True) as conn:
        return generations.drop(conn, name, list(numbers) if numbers else None)


def status(url: str, config: Config) -> dict[str, Any]:
    """Per embedding: source rows, embedded, pending, failed, model version, lag, throughput; and the
    live workers."""
    with connection(url, autocommit=True) as conn:
        return monitor.status(conn, config)


def hybrid(
    url: str,
    config: Config,
    name: str,
    text: str,
    k: int = 10,
    *,
    vector_weight: float = 1.0,
    text_weight: float = 1.0,
    rrf_k: int = 60,
) -> list[HybridHit]:
    """The ``k`` rows that best match ``text`` by keywords and by meaning: ``vectorsync.hybrid``
    with ``text`` encoded by the model of the generation in service, read in one snapshot so the
    vector and the rows it is compared with come from the same model."""
    spec = config.embedding(name)
    if not isinstance(spec, TextSpec) or spec.text_search is None:
        raise SpecError(
            f"embedding {name!r} has no keyword search; set text_search = {{ language = \"english\" }} in its "
            "spec (a text embedding) and run `vectorsync migrate`"
        )
    with connection(url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        vector = None
        if vector_weight > 0:
            emb = generations.serving_target(conn, catalog.load(conn, spec))
            vector = _encode_query(conn, emb, spec, text)
        try:
            rows = conn.execute(
                "SELECT key, score, vector_rank, text_rank FROM vectorsync.hybrid(%s, %s, %s, %s, %s, %s, %s)",
                (name, text, vector, k, vector_weight, text_weight, rrf_k),
            ).fetchall()
        except (
            psycopg.errors.RaiseException,
            psycopg.DataError,
            psycopg.errors.InsufficientPrivilege,
            psycopg.errors.FeatureNotSupported,
        ) as exc:
            # the function's own errors (bad k or weights, unknown embedding, no permission) are one line each
            raise InputError(
                "query", str(exc.diag.message_primary).removeprefix("vectorsync: "), hint=exc.diag.message_hint
            ) from None
        conn.commit()  # a pretrained encoder's model may have been registered on first use
    return [HybridHit(*row) for row in rows]


def _encode_query(conn: psycopg.Connection, emb: catalog.Embedding, spec: TextSpec, text: str) -> np.ndarray:
    with _QUERY_LOCK:
        version = emb.current_version or 0
        encoder = _QUERY_MODELS.get(conn, emb, version)
        column = models.input_renames(conn, emb, version, encoder).get(spec.input_column, spec.input_column)
        result = encoder.encode(pd.DataFrame({column: [text]}, dtype=object))
    if result.failures:
        raise InputError("query", f"cannot encode the query text {text[:80]!r}: {result.failures[0].message}")
    return np.asarray(result.vectors[0], dtype=np.float32)


def nearest(url: str, name: str, key: str, k: int = 10) -> list[Neighbour]:
    """The ``k`` rows nearest to row ``key`` (itself excluded) by the embedding's distance."""
    with connection(url, autocommit=True) as conn:
        try:
            rows = conn.execute("SELECT key, distance FROM vectorsync.nearest(%s, %s, %s)", (name, key, k)).fetchall()
        except psycopg.errors.InvalidTextRepresentation as exc:
            # the key does not convert to the source key's type (e.g. "abc" for an integer key)
            raise InputError(
                "key", f"key {key!r} does not fit embedding {name!r}'s key column: {exc.diag.message_primary}"
            ) from None
        except (
            psycopg.errors.RaiseException,
            psycopg.errors.NoDataFound,
            psycopg.DataError,
            psycopg.errors.InsufficientPrivilege,
        ) as exc:
            # the query functions' own errors (bad k, unknown embedding, no such row, not embedded
            # yet, no permission) are one line each, with the function's hint
            raise InputError(
                "key", str(exc.diag.message_primary).removeprefix("vectorsync: "), hint=exc.diag.message_hint
            ) from None
    return [Neighbour(r[0], r[1]) for r in rows]
