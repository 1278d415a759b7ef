"""Graph embeddings: native FastRP over edges held in Postgres, and the Neo4j bridge.

Native FastRP is kept fresh from change capture: triggers on the node and edge tables log what
changed (``vectorsync.graph_changes``, migration 0011) and NOTIFY. A run with nothing logged since
the last one does no graph work. A process that ran the last sync keeps the graph and every
FastRP iteration in memory (the worker does) and applies the logged changes incrementally,
recomputing only the nodes a change can reach and writing only vectors that moved; otherwise the
run reads the whole graph and computes it (``details.mode``: ``unchanged``, ``incremental`` or
``full``). Each run is one REPEATABLE READ transaction, so readers see the previous run's vectors
or the new ones, and the change log it consumes is exactly the one its snapshot saw; it is recorded
in ``vectorsync.runs`` with its counts.

Model versions: a graph embedding has no trained weights, but its vectors are only comparable when
they were made with the same parameters. Each distinct parameter set (FastRP's parameters, or the
bridge's label / key / property or algorithm and config) is registered once in
``vectorsync.models`` with empty weights; runs with the same parameters reuse that version, and
changing a parameter makes a new version current, which rewrites every vector once.

Edges whose source or target is not a node key (a deleted node whose edges remain, say) are left
out of the graph, with a warning and a count in the run's details: a continuously synced graph must
survive them. When no edge at all matches a node, the columns are wrong and the run stops with an
error naming the table, column and an example value.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.base import Progress as TrainingProgress
from vectorsync.encoders.fastrp import Edges, FastRPParams, IncrementalFastRP, node_keys
from vectorsync.encoders.graphsage import GraphSAGEEncoder, LocalGraph, frame_of
from vectorsync.errors import InputError
from vectorsync.sync import generations, models, queue, sink, sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.db import scalar
from vectorsync.sync.neo4j_bridge import BridgeError, fingerprint, stream_embeddings
from vectorsync.sync.progress import Progress
from vectorsync.sync.spec import GraphEmbeddingSpec, GraphSpec, split_qualified

log = logging.getLogger(__name__)

#: Vectors per ``sink.upsert`` call (one binary COPY each).
CHUNK_ROWS = 20_000
#: The version of this module's FastRP; bumping it re-embeds every native graph.
FASTRP_IMPLEMENTATION = 2
#: More logged changes than this are applied by reading the whole graph again.
MAX_INCREMENTAL_CHANGES = 200_000
_INTEGER_KEYS = {"smallint", "integer", "bigint"}
_NODES = sql.Identifier("vectorsync_graph_nodes")
_SEEN = sql.Identifier("vectorsync_graph_seen")

#: ``advance(done, info, total=None)`` moves the progress bar.
Advance = Callable[..., None]


def sync_graph(conn: psycopg.Connection, emb: Embedding, progress: Progress | None = None) -> dict[str, int]:
    """Recompute and store every node embedding of a graph spec; ``conn`` must be in autocommit mode.

    Returns ``run_id``, ``embedded`` (rows written), ``unchanged`` (identical vectors left as they
    were), ``deleted`` (vectors of vanished nodes) and, for native FastRP, ``nodes``, ``edges`` and
    ``skipped_edges``.
    """
    spec = emb.spec
    if not isinstance(spec, GraphEmbeddingSpec):
        raise ValueError(f"embedding {emb.name!r} is a {spec.modality} embedding, not a graph")
    kind = "bridge" if spec.neo4j else spec.encoder_type
    run_id = queue.start_run(conn, emb.name, kind)
    started = time.perf_counter()

    def advance(done: int, info: str, total: int | None = None) -> None:
        if progress is not None:
            progress(done, total, info)

    advance(0, kind)

    try:
        if spec.neo4j:
            counts, details = _bridge(conn, emb, advance, run_id)
        elif spec.encoder_type == "graphsage":
            counts, details = _graphsage(conn, emb, advance)
        else:
            counts, details = _native(conn, emb, advance, run_id)
    except BaseException as exc:
        queue.fail_run(conn, run_id, exc)
        raise
    details["seconds"] = round(time.perf_counter() - started, 3)
    queue.finish_run(
        conn, run_id, emb.name, embedded=counts["embedded"], unchanged=counts["unchanged"], deleted=counts["deleted"],
        details=details,
    )
    return {"run_id": run_id, **counts}


class GraphRunner:
    """The worker's graph runs: a native FastRP graph runs as soon as its change log has rows
    (checked every tick; its NOTIFY wakes the row workers, not this loop), and any graph with
    ``schedule_seconds`` also runs on that schedule (a bridge run skips work when the Neo4j graph
    did not change). A failed run is logged and retried next time: it must not stop the workers."""

    def __init__(self, url: str, specs: list[GraphEmbeddingSpec]) -> None:
        self.url = url
        self.native = [s for s in specs if s.graph is not None and s.encoder_type == "fastrp"]
        self.scheduled = [s for s in specs if s.schedule_seconds]
        self._next: dict[str, float] = {s.name: 0.0 for s in self.scheduled}
        self._conn: psycopg.Connection | None = None

    def tick(self) -> None:
        if not self.native and not self.scheduled:
            return
        try:
            if self._conn is None or self._conn.closed:
                from vectorsync.sync.db import connect

                self._conn = connect(self.url, autocommit=True)
            due = {s.name: s for s in self.native if changes_pending(self._conn, s.name)}
            for spec in self.scheduled:
                if time.monotonic() >= self._next[spec.name]:
                    due[spec.name] = spec
                    self._next[spec.name] = time.monotonic() + (spec.schedule_seconds or 0)
            for spec in due.values():
                from vectorsync.sync import catalog

                sync_graph(self._conn, catalog.load(self._conn, spec))
        except Exception as exc:  # a bridge outage or a bad edge must not stop the row workers
            log.warning("graph embeddings failed this round: %s", exc)
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _lock(conn: psycopg.Connection, emb: Embedding) -> None:
    """One run of an embedding at a time (a CLI sync next to a scheduled worker run waits)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('vectorsync.graph:' || %s, 0))", (emb.name,))


def model_version(conn: psycopg.Connection, emb: Embedding, encoder_type: str, params: dict[str, Any]) -> int:
    """The registry version for this parameter set, registered (with empty weights) on first use and
    made current. Call inside the run's transaction, so a failed run registers nothing."""
    models.lock_registry(conn, emb)
    row = conn.execute(
        "SELECT version FROM vectorsync.models WHERE embedding = %s AND encoder_type = %s AND params = %s::jsonb "
        "ORDER BY version DESC LIMIT 1",
        (emb.name, encoder_type, json.dumps(params, sort_keys=True)),
    ).fetchone()
    if row is None:
        return models.register_version(conn, emb, encoder_type=encoder_type, weights=b"", params=params)
    if models.current_version(conn, emb.name) != row[0]:  # a worker role may not update the catalogue
        models.make_current(conn, emb, row[0])
    return row[0]


def _upsert_chunks(
    conn: psycopg.Connection, emb: Embedding, keys: list[str], vectors: np.ndarray, version: int, advance: Advance
) -> int:
    written = 0
    for start in range(0, len(keys), CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, len(keys))
        written += sink.upsert(conn, emb, keys[start:stop], vectors[start:stop], version)
        advance(stop, "writing")
    return written


# ---------------------------------------------------------------------------------------------
# Native FastRP
# ---------------------------------------------------------------------------------------------


@dataclass
class _Graph:
    keys: list[str]
    ids: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    weights: np.ndarray | None
    features: np.ndarray | None
    edge_rows: int
    skipped_edges: int


def fastrp_params(spec: GraphEmbeddingSpec) -> dict[str, Any]:
    """What determines the vectors besides the data: the model version's identity."""
    assert spec.graph is not None
    g = spec.graph
    return {
        "algorithm": "fastRP",
        "implementation": FASTRP_IMPLEMENTATION,
        "dim": spec.dim,
        "orientation": g.orientation,
        "weight_column": g.weight_column,
        "feature_columns": list(g.feature_columns),
        "iteration_weights": list(g.iteration_weights),
        "node_self_influence": g.node_self_influence,
        "normalization_strength": g.normalization_strength,
        "property_ratio": g.property_ratio,
        "random_seed": g.random_seed,
    }


def _native(
    conn: psycopg.Connection, emb: Embedding, advance: Advance, run_id: int
) -> tuple[dict[str, int], dict[str, Any]]:
    """One native FastRP run, in one REPEATABLE READ transaction: the change log it consumes is
    exactly the one its snapshot saw, so a change committed meanwhile stays for the next run."""
    spec = emb.spec
    assert isinstance(spec, GraphEmbeddingSpec) and spec.graph is not None
    params = fastrp_params(spec)
    conn.execute("SELECT pg_advisory_lock(hashtextextended('vectorsync.graph:' || %s, 0))", (emb.name,))
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            state = _graph_state(conn, emb)
            changes = _pending_changes(conn, emb)
            # the stored vectors are what the last run left (nobody emptied the target meanwhile)
            unchanged = (
                state is not None
                and state["params"] == params
                and state["model_version"] == models.current_version(conn, emb.name)
                and _target_intact(conn, emb, state["nodes"])
            )
            if unchanged and changes == 0:
                assert state is not None
                nodes = int(state["nodes"])
                advance(nodes, "nothing changed since the last run", nodes)
                log.info("embedding %s: nothing changed since the last run; no graph work", emb.name)
                counts = {"embedded": 0, "unchanged": nodes, "deleted": 0, "nodes": nodes, "model_version":
                          state["model_version"]}
                return counts, {"mode": "unchanged", "nodes": nodes, "model_version": state["model_version"]}
            cached = _CACHE.pop(emb.name, None)
            usable = (
                cached is not None
                and unchanged
                and state is not None
                and cached.serial == state["serial"]
                and cached.params == params
            )
            if usable:
                assert cached is not None
                outcome = _incremental(conn, emb, spec.graph, cached, changes, advance)
            else:
                outcome = None
            if outcome is None:
                counts, details, cached = _full(conn, emb, spec.graph, params, advance)
            else:
                counts, details = outcome
            assert cached is not None
            conn.execute("DELETE FROM vectorsync.graph_changes WHERE embedding = %s", (emb.name,))
            _save_state(conn, emb, counts["model_version"], params, counts["nodes"], run_id)
        cached.serial = run_id
        _CACHE[emb.name] = cached
        return counts, details
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtextextended('vectorsync.graph:' || %s, 0))", (emb.name,))


@dataclass
class _Cached:
    """A process's FastRP state of one embedding, valid while ``serial`` is the last run's id."""

    serial: int
    params: dict[str, Any]
    version: int
    state: IncrementalFastRP
    keys: list[str]
    positions: dict[str, int]


#: Incremental FastRP states of this process (the worker keeps them between runs).
_CACHE: dict[str, _Cached] = {}


def _graph_state(conn: psycopg.Connection, emb: Embedding) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT model_version, params, nodes, serial FROM vectorsync.graph_state WHERE embedding = %s", (emb.name,)
    ).fetchone()
    return None if row is None else dict(zip(("model_version", "params", "nodes", "serial"), row, strict=True))


def _save_state(
    conn: psycopg.Connection, emb: Embedding, version: int, params: dict[str, Any], nodes: int, run_id: int
) -> None:
    conn.execute(
        "INSERT INTO vectorsync.graph_state (embedding, model_version, params, nodes, serial) "
        "VALUES (%(name)s, %(version)s, %(params)s, %(nodes)s, %(serial)s) ON CONFLICT (embedding) DO UPDATE "
        "SET model_version = EXCLUDED.model_version, params = EXCLUDED.params, nodes = EXCLUDED.nodes, "
        "serial = EXCLUDED.serial, synced_at = now()",
        {"name": emb.name, "version": version, "params": json.dumps(params, default=str), "nodes": nodes,
         "serial": run_id},
    )


def _target_intact(conn: psycopg.Connection, emb: Embedding, nodes: int) -> bool:
    """Whether the target still holds vectors when the last run left ``nodes`` of them. Counting
    the rows would read the whole table (seconds at a million vectors) on every run with nothing to
    do; a target emptied by hand (or by a rollback to an empty generation) is what happens in
    practice, and a node whose vector was deleted alone gets it back when the node changes."""
    has_rows = bool(scalar(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(emb.target)))
    return has_rows == (nodes > 0)


def _pending_changes(conn: psycopg.Connection, emb: Embedding) -> int:
    """Changes logged since the last run, counted up to a bound (past it, a full run is due anyway)."""
    return scalar(
        conn,
        "SELECT count(*) FROM (SELECT 1 FROM vectorsync.graph_changes WHERE embedding = %s LIMIT %s) c",
        (emb.name, MAX_INCREMENTAL_CHANGES + 1),
    )


def changes_pending(conn: psycopg.Connection, name: str) -> bool:
    """Whether a native graph embedding has changes its last run has not seen."""
    return scalar(conn, "SELECT EXISTS (SELECT 1 FROM vectorsync.graph_changes WHERE embedding = %s)", (name,))


def _fastrp_params(graph: GraphSpec, dim: int) -> FastRPParams:
    return FastRPParams(
        dim=dim,
        iteration_weights=tuple(graph.iteration_weights),
        node_self_influence=graph.node_self_influence,
        normalization_strength=graph.normalization_strength,
        orientation=graph.orientation,
        property_ratio=graph.property_ratio,
        random_seed=graph.random_seed,
    )


def _full(
    conn: psycopg.Connection, emb: Embedding, graph_spec: GraphSpec, params: dict[str, Any], advance: Advance
) -> tuple[dict[str, int], dict[str, Any], _Cached]:
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    advance(0, "reading the graph")
    graph = read_graph(conn, emb, graph_spec)
    timings["read_seconds"] = time.perf_counter() - clock
    n = len(graph.keys)
    advance(0, f"FastRP over {n} nodes, {len(graph.src)} edges", n)
    clock = time.perf_counter()
    try:
        state = IncrementalFastRP(
            _fastrp_params(graph_spec, emb.spec.dim),
            graph.ids,
            Edges(graph.src, graph.dst, graph.weights),
            graph.features,
        )
    except ValueError as exc:
        raise InputError(None, f"embedding {emb.name!r}: {exc}") from None
    vectors = state.embedding(np.arange(n))
    timings["compute_seconds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    version = model_version(conn, emb, "fastrp", params)
    rebuild = _drop_index_for_large_load(conn, emb, n)
    written = _upsert_chunks(conn, emb, graph.keys, vectors, version, advance)
    deleted = sink.delete_orphans(conn, emb)
    if rebuild:
        from vectorsync.sync.bulk import create_index

        create_index(conn, emb)
    timings["write_seconds"] = time.perf_counter() - clock
    log.info("embedding %s: full FastRP run over %d nodes, %d vectors written", emb.name, n, written)
    counts = {
        "embedded": written,
        "unchanged": n - written,
        "deleted": deleted,
        "nodes": n,
        "edges": len(graph.src),
        "skipped_edges": graph.skipped_edges,
        "model_version": version,
    }
    details = {
        "mode": "full",
        "nodes": n,
        "edges": len(graph.src),
        "skipped_edges": graph.skipped_edges,
        "model_version": version,
        "edges_table": graph_spec.edges,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    positions = dict(zip(graph.keys, range(n), strict=True))
    return counts, details, _Cached(0, params, version, state, list(graph.keys), positions)


def _incremental(
    conn: psycopg.Connection,
    emb: Embedding,
    graph_spec: GraphSpec,
    cached: _Cached,
    pending: int,
    advance: Advance,
) -> tuple[dict[str, int], dict[str, Any]] | None:
    """Apply the logged changes to the process's FastRP state; None when a full run must read the
    graph again (a TRUNCATE, or more changes than an incremental run is worth)."""
    if pending > MAX_INCREMENTAL_CHANGES:
        log.info("embedding %s: %d+ changes logged; reading the whole graph again", emb.name, pending)
        return None
    clock = time.perf_counter()
    rows = conn.execute(
        "SELECT kind, source, target, weight FROM vectorsync.graph_changes WHERE embedding = %s", (emb.name,)
    ).fetchall()
    if any(kind == "all" for kind, *_ in rows):
        log.info("embedding %s: a node or edge table was truncated; reading the whole graph again", emb.name)
        return None
    touched = sorted({source for kind, source, _, _ in rows if kind == "node"})
    present, features = _read_nodes(conn, emb, graph_spec, touched)
    touched_set = set(touched)
    new_keys = [k for k in touched if k not in cached.positions]
    state = cached.state
    for key, position in zip(new_keys, state.add_nodes(_node_ids(emb, new_keys)), strict=True):
        cached.positions[key] = int(position)
        cached.keys.append(key)
    reset = np.array([cached.positions[k] for k in touched], dtype=np.int64)
    dead = np.array([cached.positions[k] for k in touched if k not in present], dtype=np.int64)
    alive_after = state.alive.copy()
    alive_after[reset] = [k in present for k in touched]
    added: list[tuple[int, int, float]] = []
    removed: list[tuple[int, int, float]] = []
    # A touched node's edges are read again whole (its reset drops the ones the state held).
    logged = [(k, s, t, w) for k, s, t, w in rows if k != "node" and s not in touched_set and t not in touched_set]
    current = [("edge+", s, t, w) for s, t, w in _edges_of(conn, emb, graph_spec, sorted(present))]
    for kind, source, target, weight in logged + current:
        a, b = cached.positions.get(source), cached.positions.get(target)
        if a is None or b is None or not (alive_after[a] and alive_after[b]):
            continue  # a dangling edge: left out, as in a full run
        value = 1.0 if weight is None else float(weight)
        if graph_spec.weight_column and not (np.isfinite(value) and value >= 0):
            raise InputError(
                graph_spec.weight_column,
                f"embedding {emb.name!r}: edge {source} -> {target} in table {graph_spec.edges!r} has weight "
                f"{'NULL' if weight is None else weight} in column {graph_spec.weight_column!r}; "
                "weights must be finite and >= 0"
            )
        (added if kind == "edge+" else removed).append((a, b, value))
    read_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    weighted = graph_spec.weight_column is not None
    result = state.update(
        added=_edges(added, weighted),
        removed=_edges(removed, weighted),
        reset=reset,
        dead=dead,
        features=features[: len(reset)] if features is not None else None,
    )
    compute_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    written_positions = result.written
    keys = [cached.keys[i] for i in written_positions]
    written = _upsert_chunks(conn, emb, keys, state.embedding(written_positions), cached.version, advance)
    deleted = sink.delete_keys(conn, emb, [cached.keys[i] for i in dead])
    nodes = int(state.alive.sum())
    log.info(
        "embedding %s: %s FastRP run for %d logged change(s): recomputed %s node(s) per iteration, wrote %d",
        emb.name, result.mode, len(rows), result.recomputed, written,
    )
    counts = {
        "embedded": written,
        "unchanged": nodes - written,
        "deleted": deleted,
        "nodes": nodes,
        "model_version": cached.version,
    }
    details = {
        "mode": result.mode,
        "changes": len(rows),
        "recomputed": result.recomputed,
        "nodes": nodes,
        "model_version": cached.version,
        "read_seconds": round(read_seconds, 3),
        "compute_seconds": round(compute_seconds, 3),
        "write_seconds": round(time.perf_counter() - clock, 3),
    }
    return counts, details


def _drop_index_for_large_load(conn: psycopg.Connection, emb: Embedding, nodes: int) -> bool:
    """Like the tabular bulk path: a first load of many vectors builds the index once afterwards."""
    from vectorsync.sync.bulk import BULK_THRESHOLD, drop_index, target_rows

    if emb.spec.index.kind == "none" or nodes < BULK_THRESHOLD or target_rows(conn, emb) * 2 >= nodes:
        return False
    drop_index(conn, emb)
    return True


def _edges_table(emb: Embedding, graph: GraphSpec) -> sql.Identifier:
    schema, table = split_qualified(graph.edges)
    return sql.Identifier(schema or emb.source_schema, table)


def _column_type(conn: psycopg.Connection, emb: Embedding, column: str) -> str:
    row = conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
        "AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (emb.source.as_string(conn), column),
    ).fetchone()
    if row is None:
        raise InputError(
            column, f"embedding {emb.name!r}: feature column {column!r} not found in table {emb.source_table!r}"
        )
    return row[0]


def _feature_expression(column: str, type_name: str) -> sql.Composable:
    """Every feature column read as float8 or float8[] (booleans as 0/1)."""
    ident = sql.Identifier(column)
    if type_name == "boolean":
        return sql.SQL("CAST(CAST({} AS integer) AS float8)").format(ident)
    if type_name.endswith("[]"):
        return sql.SQL("CAST({} AS float8[])").format(ident)
    return sql.SQL("CAST({} AS float8)").format(ident)


def read_graph(conn: psycopg.Connection, emb: Embedding, graph: GraphSpec) -> _Graph:
    """Nodes, edges and features (call inside a REPEATABLE READ transaction, for one consistent
    snapshot). Node ``i`` is the ``i``-th key in key order, so the same data always gives the same
    sparse matrix and bit-identical vectors."""
    edges = _edges_table(emb, graph)
    columns = [(c, _column_type(conn, emb, c)) for c in graph.feature_columns]
    try:
        with conn.transaction():
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_NODES))
            features = [
                sql.SQL(", {} AS {}").format(_feature_expression(c, t), sql.Identifier(f"f{i}"))
                for i, (c, t) in enumerate(columns)
            ]
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE {nodes} ON COMMIT DROP AS SELECT {key} AS key, "
                    "(row_number() OVER (ORDER BY {key}) - 1)::integer AS i{features} FROM {source} "
                    "WHERE {key} IS NOT NULL"
                ).format(nodes=_NODES, key=emb.key, features=sql.SQL("").join(features), source=emb.source)
            )
            conn.execute(sql.SQL("ANALYZE {}").format(_NODES))
            keys = _read_keys(conn)
            _check_unique(emb, keys)
            matrix = _read_features(conn, emb, keys, columns) if columns else None
            src, dst, weights = _read_edges(conn, edges, graph)
            edge_rows = scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(edges))
            skipped = edge_rows - len(src)
            if skipped:
                _report_dangling(conn, emb, edges, graph, edge_rows, skipped)
    except psycopg.errors.UndefinedFunction as exc:  # e.g. text edge columns against integer node keys
        message = str(exc).strip().splitlines()[0]
        raise InputError(
            None,
            f"embedding {emb.name!r}: the edge columns of {graph.edges!r} cannot be compared with the node keys "
            f"({emb.key_column}, {emb.key_type}): {message}; give them the same type"
        ) from None
    if weights is not None:
        _check_weights(emb, graph, keys, src, dst, weights)
        # Duplicate edges' weights are summed: a fixed order keeps the float sums bit-identical.
        order = np.lexsort((weights, dst, src))
        src, dst, weights = src[order], dst[order], weights[order]
    return _Graph(keys, _node_ids(emb, keys), src, dst, weights, matrix, edge_rows, skipped)


def _node_ids(emb: Embedding, keys: list[str]) -> np.ndarray:
    """FastRP's stable per-node integer keys for the text form of Postgres keys."""
    if emb.key_type in _INTEGER_KEYS:
        return node_keys(pd.Series(keys, dtype=str).astype(np.int64).to_numpy())
    return node_keys(keys)


def _read_nodes(
    conn: psycopg.Connection, emb: Embedding, graph: GraphSpec, keys: list[str]
) -> tuple[set[str], np.ndarray | None]:
    """Which of ``keys`` are nodes now, and their features (one row per key; zeros for gone ones)."""
    if not keys:
        return set(), None
    columns = [(c, _column_type(conn, emb, c)) for c in graph.feature_columns]
    features = [sql.SQL(", {}").format(_feature_expression(c, t)) for c, t in columns]
    with conn.cursor(binary=True) as cur:
        cur.execute(
            sql.SQL("SELECT {key}::text{features} FROM {source} WHERE {key} = ANY(CAST(%s AS {karr}))").format(
                key=emb.key, features=sql.SQL("").join(features), source=emb.source, karr=emb.key_array_type
            ),
            (keys,),
        )
        found = {row[0]: row[1:] for row in cur.fetchall()}
    if not columns:
        return set(found), None
    present = [k for k in keys if k in found]
    matrix = _feature_matrix(emb, present, columns, [found[k] for k in present])
    out = np.zeros((len(keys), matrix.shape[1]))
    out[[i for i, k in enumerate(keys) if k in found]] = matrix
    return set(found), out


def _edges_of(
    conn: psycopg.Connection, emb: Embedding, graph: GraphSpec, keys: list[str]
) -> list[tuple[str, str, float | None]]:
    """Every edge with an end among ``keys`` (each edge once)."""
    if not keys:
        return []
    weight = sql.SQL("CAST({} AS float8)").format(sql.Identifier(graph.weight_column)) if graph.weight_column \
        else sql.SQL("NULL::float8")
    return conn.execute(
        sql.SQL(
            "SELECT {s}::text, {t}::text, {w} FROM {edges} WHERE {s} = ANY(CAST(%(k)s AS {karr})) "
            "OR {t} = ANY(CAST(%(k)s AS {karr}))"
        ).format(
            s=sql.Identifier(graph.source_column),
            t=sql.Identifier(graph.target_column),
            w=weight,
            edges=_edges_table(emb, graph),
            karr=emb.key_array_type,
        ),
        {"k": keys},
    ).fetchall()


def _edges(edges: list[tuple[int, int, float]], weighted: bool) -> Edges:
    if not edges:
        return Edges.empty()
    table = np.array(edges, dtype=np.float64)
    return Edges(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2] if weighted else None)


def _copy_out(conn: psycopg.Connection, statement: sql.Composed) -> bytes:
    buffer = BytesIO()
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for block in copy:
            buffer.write(block)
    return buffer.getvalue()


def _read_keys(conn: psycopg.Connection) -> list[str]:
    data = _copy_out(
        conn, sql.SQL("COPY (SELECT key::text FROM {} ORDER BY i) TO STDOUT WITH (FORMAT csv)").format(_NODES)
    )
    if not data:
        return []
    frame = pd.read_csv(BytesIO(data), header=None, dtype=str, keep_default_na=False, na_filter=False)
    return frame[0].tolist()


def _check_unique(emb: Embedding, keys: list[str]) -> None:
    duplicated = pd.Series(keys).duplicated()
    if duplicated.any():
        example = keys[int(np.flatnonzero(duplicated.to_numpy())[0])]
        raise InputError(
            None,
            f"embedding {emb.name!r}: key {example!r} appears more than once in {emb.source_table!r}; "
            f"{emb.key_column!r} must be unique"
        )


def _read_edges(
    conn: psycopg.Connection, edges: sql.Identifier, graph: GraphSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Edges as node indexes, mapped to indexes inside Postgres and read as fixed-width binary COPY
    records (NULL weights arrive as NaN, so every record has the same width)."""
    weight = (
        sql.SQL(", coalesce(CAST(e.{} AS float8), 'NaN')").format(sql.Identifier(graph.weight_column))
        if graph.weight_column
        else sql.SQL("")
    )
    data = _copy_out(
        conn,
        sql.SQL(
            "COPY (SELECT a.i, b.i{weight} FROM {edges} e JOIN {nodes} a ON a.key = e.{source} "
            "JOIN {nodes} b ON b.key = e.{target}) TO STDOUT WITH (FORMAT binary)"
        ).format(
            weight=weight,
            edges=edges,
            nodes=_NODES,
            source=sql.Identifier(graph.source_column),
            target=sql.Identifier(graph.target_column),
        ),
    )
    fields = [("count", ">i2"), ("len_a", ">i4"), ("a", ">i4"), ("len_b", ">i4"), ("b", ">i4")]
    if graph.weight_column:
        fields += [("len_w", ">i4"), ("w", ">f8")]
    record = np.dtype(fields)
    header = 11 + 4 + 4 + int.from_bytes(data[15:19], "big")  # signature, flags, extension length
    rows = (len(data) - header - 2) // record.itemsize
    table = np.frombuffer(data, dtype=record, count=rows, offset=header)
    src = table["a"].astype(np.int32)
    dst = table["b"].astype(np.int32)
    weights = table["w"].astype(np.float64) if graph.weight_column else None
    return src, dst, weights


def _report_dangling(
    conn: psycopg.Connection, emb: Embedding, edges: sql.Identifier, graph: GraphSpec, total: int, skipped: int
) -> None:
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE a.i IS NULL), "
            "min(coalesce(e.{s}::text, 'NULL')) FILTER (WHERE a.i IS NULL), "
            "count(*) FILTER (WHERE b.i IS NULL), "
            "min(coalesce(e.{t}::text, 'NULL')) FILTER (WHERE b.i IS NULL) "
            "FROM {edges} e LEFT JOIN {nodes} a ON a.key = e.{s} LEFT JOIN {nodes} b ON b.key = e.{t} "
            "WHERE a.i IS NULL OR b.i IS NULL"
        ).format(
            s=sql.Identifier(graph.source_column), t=sql.Identifier(graph.target_column), edges=edges, nodes=_NODES
        )
    ).fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    bad_source, source_example, bad_target, target_example = row
    column, example = (graph.source_column, source_example) if bad_source else (graph.target_column, target_example)
    where = f"{column!r} value {example!r} in edge table {graph.edges!r} is not a key of {emb.source_table!r}"
    if skipped == total:
        raise InputError(
            None,
            f"embedding {emb.name!r}: none of the {total} edges connects two nodes ({where}); "
            "check graph.source_column / graph.target_column and the node table's key"
        )
    log.warning(
        "embedding %s: skipping %d of %d edges whose source (%d) or target (%d) is not a node, e.g. %s",
        emb.name, skipped, total, bad_source, bad_target, where,
    )


def _check_weights(
    emb: Embedding, graph: GraphSpec, keys: list[str], src: np.ndarray, dst: np.ndarray, weights: np.ndarray
) -> None:
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            None,
            f"embedding {emb.name!r}: edge {keys[src[i]]} -> {keys[dst[i]]} in table {graph.edges!r} has weight "
            f"{'NULL or NaN' if np.isnan(weights[i]) else weights[i]} in column {graph.weight_column!r} "
            f"({bad.size} such edges); weights must be finite and >= 0"
        )


def _read_features(
    conn: psycopg.Connection, emb: Embedding, keys: list[str], columns: list[tuple[str, str]]
) -> np.ndarray:
    names = sql.SQL(", ").join(sql.Identifier(f"f{i}") for i in range(len(columns)))
    with conn.cursor(binary=True) as cur:
        cur.execute(sql.SQL("SELECT {} FROM {} ORDER BY i").format(names, _NODES))
        rows = cur.fetchall()
    return _feature_matrix(emb, keys, columns, rows)


def _feature_matrix(
    emb: Embedding, keys: list[str], columns: list[tuple[str, str]], rows: list[Any]
) -> np.ndarray:
    """Feature rows (one value per column, arrays spread) as a float matrix; bad values name the node."""
    blocks: list[np.ndarray] = []
    for position, (column, type_name) in enumerate(columns):
        values = [row[position] for row in rows]
        if type_name.endswith("[]"):
            block = _array_feature(emb, keys, column, values)
        else:
            block = np.array(values, dtype=np.float64).reshape(-1, 1)
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad.size:
            raise InputError(
                None,
                f"embedding {emb.name!r}: node {keys[bad[0]]} has a NULL, NaN or infinite value in feature column "
                f"{column!r} ({bad.size} such nodes); fill it in or leave the column out of graph.feature_columns"
            )
        blocks.append(block)
    return np.hstack(blocks) if blocks else np.zeros((len(keys), 0))


def _array_feature(emb: Embedding, keys: list[str], column: str, values: list[Any]) -> np.ndarray:
    lengths = np.array([-1 if v is None else len(v) for v in values])
    if len(lengths) == 0:
        return np.zeros((0, 0))
    expected = int(np.bincount(lengths[lengths >= 0]).argmax()) if (lengths >= 0).any() else 0
    odd = np.flatnonzero(lengths != expected)
    if odd.size:
        i = int(odd[0])
        got = "NULL" if lengths[i] < 0 else f"{lengths[i]} values"
        raise InputError(
            None,
            f"embedding {emb.name!r}: node {keys[i]} has {got} in feature column {column!r} where the other nodes "
            f"have {expected}; every node needs an array of the same length"
        )
    return np.array(values, dtype=np.float64).reshape(len(values), expected)


# ---------------------------------------------------------------------------------------------
# Neo4j bridge
# ---------------------------------------------------------------------------------------------


def bridge_params(spec: GraphEmbeddingSpec) -> dict[str, Any]:
    """What determines the vectors besides the graph (not where the server is or how to log in)."""
    assert spec.neo4j is not None
    n = spec.neo4j
    return {
        "source": "neo4j",
        "dim": spec.dim,
        "label": n.label,
        "key_property": n.key_property,
        "property": n.property,
        "algorithm": n.algorithm,
        "relationship_types": list(n.relationship_types),
        "config": dict(n.config),
    }


def _bridge(
    conn: psycopg.Connection, emb: Embedding, advance: Advance, run_id: int
) -> tuple[dict[str, int], dict[str, Any]]:
    spec = emb.spec
    assert isinstance(spec, GraphEmbeddingSpec) and spec.neo4j is not None
    neo = spec.neo4j
    info: dict[str, Any] = {}
    embedded = seen = pages = 0
    # An algorithm's vectors depend on the graph only: an unchanged fingerprint means nothing to
    # do. Stored vectors (``property``) can change with no node or relationship added, so they are
    # always copied.
    made_from = None
    if neo.algorithm is not None:
        advance(0, f"fingerprinting {neo.uri}")
        made_from = {"bridge": bridge_params(spec), "fingerprint": fingerprint(neo)}
        state = _graph_state(conn, emb)
        if (
            state is not None
            and state["params"] == json.loads(json.dumps(made_from, default=str))
            and state["model_version"] == models.current_version(conn, emb.name)
            and _target_intact(conn, emb, state["nodes"])
        ):
            nodes = int(state["nodes"])
            log.info("embedding %s: the Neo4j graph did not change since the last run; nothing to copy", emb.name)
            counts = {"embedded": 0, "unchanged": nodes, "deleted": 0, "model_version": state["model_version"]}
            return counts, {
                "mode": "unchanged",
                "reason": "the Neo4j graph did not change (same node and relationship counts and largest ids)",
                "fingerprint": made_from["fingerprint"],
                "uri": neo.uri,
                "label": neo.label,
            }
    advance(0, f"connecting to {neo.uri}")
    with conn.transaction():
        _lock(conn, emb)
        version = model_version(conn, emb, "neo4j", bridge_params(spec))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_SEEN))
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {seen} ON COMMIT DROP AS SELECT {key} AS key FROM {target} WITH NO DATA").format(
                seen=_SEEN, key=emb.key, target=emb.target
            )
        )
        with closing(stream_embeddings(neo, spec.dim, info=info)) as stream:
            for keys, vectors in _with_text_keys(stream):
                try:
                    embedded += sink.upsert(conn, emb, keys, vectors, version)
                    conn.execute(
                        sql.SQL("INSERT INTO {} SELECT unnest(CAST(%s AS {}))").format(_SEEN, emb.key_array_type),
                        (keys,),
                    )
                except psycopg.errors.DataError as exc:
                    message = str(exc).strip().splitlines()[0]
                    raise BridgeError(
                        f"the {neo.label!r} nodes' {neo.key_property!r} values (e.g. {keys[0]!r}) cannot be stored "
                        f"in {emb.key_column!r} of type {emb.key_type}: {message}; use a key_property of that type"
                    ) from None
                seen += len(keys)
                pages += 1
                advance(seen, f"{info.get('dialect', '')} page {pages}", int(info.get("nodes") or 0) or None)
        conn.execute(sql.SQL("ANALYZE {}").format(_SEEN))
        deleted = conn.execute(
            sql.SQL("DELETE FROM {target} t WHERE NOT EXISTS (SELECT 1 FROM {seen} s WHERE s.key = t.{key})").format(
                target=emb.target, seen=_SEEN, key=emb.key
            )
        ).rowcount
        if made_from is not None:
            _save_state(conn, emb, version, made_from, seen, run_id)
    counts = {"embedded": embedded, "unchanged": seen - embedded, "deleted": deleted, "model_version": version}
    details = {
        **info,
        "mode": "full",
        "uri": neo.uri,
        "database": neo.database,
        "label": neo.label,
        "source": f"property {neo.property}" if neo.property else f"algorithm {neo.algorithm}",
        "pages": pages,
        "model_version": version,
    }
    return counts, details


def _with_text_keys(pages: Iterator[tuple[list[Any], np.ndarray]]) -> Iterator[tuple[list[str], np.ndarray]]:
    """Keys in their text form: the sink casts them to the Postgres key type."""
    for keys, vectors in pages:
        yield [str(k) for k in keys], vectors


# ---------------------------------------------------------------------------------------------
# Native GraphSAGE
# ---------------------------------------------------------------------------------------------


def train_graphsage(
    conn: psycopg.Connection, emb: Embedding, *, progress: TrainingProgress | None = None
) -> tuple[int, dict[str, float], int]:
    """Train GraphSAGE on the whole graph as it is now, store it as a new model version, and start
    the generation that embeds it. Returns (version, metrics, nodes)."""
    spec = emb.spec
    assert isinstance(spec, GraphEmbeddingSpec) and spec.graph is not None and spec.encoder is not None
    encoder = models.new_encoder(spec)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        graph = read_graph(conn, emb, spec.graph)
        label_column = spec.encoder.label_column
        labels = _labels(conn, emb, graph.keys, label_column) if label_column else None
    if not graph.keys:
        raise InputError(None, f"embedding {spec.name!r}: table {spec.table!r} has no nodes to train on")
    local = _local(graph, spec.graph, labels)
    frame = frame_of(local, graph.keys, np.arange(len(graph.keys)), sources.KEY)
    metrics = encoder.fit(lambda: iter([frame]), seed=spec.encoder.seed, progress=progress)
    with conn.transaction():
        version = models.store(conn, emb, encoder, {k: float(v) for k, v in metrics.items()}, len(graph.keys))
        generations.start(conn, emb, version)
    return version, metrics, len(graph.keys)


def _local(graph: _Graph, graph_spec: GraphSpec, labels: np.ndarray | None = None) -> LocalGraph:
    features = graph.features if graph.features is not None else np.zeros((len(graph.keys), 0))
    return LocalGraph.from_edges(features, graph.src, graph.dst, graph_spec.orientation, labels)


def _labels(conn: psycopg.Connection, emb: Embedding, keys: list[str], column: str) -> np.ndarray:
    """Integer codes of the label column per node (-1 where it is NULL)."""
    rows: dict[str, str | None] = dict(
        conn.execute(
            sql.SQL("SELECT {key}::text, {label}::text FROM {source}").format(
                key=emb.key, label=sql.Identifier(column), source=emb.source
            )
        ).fetchall()
    )
    codes, _ = pd.factorize(pd.Series([rows.get(k) for k in keys], dtype=object))
    return codes.astype(np.int64)


def _input_hashes(conn: psycopg.Connection, emb: Embedding, keys: list[str] | None = None) -> dict[str, str]:
    """The input hash of each node's feature values (all nodes, or these keys)."""
    where = sql.SQL(" WHERE s.{} = ANY(CAST(%s AS {}))").format(emb.key, emb.key_array_type) if keys is not None \
        else sql.SQL("")
    return dict(
        conn.execute(
            sql.SQL("SELECT s.{key}::text, {hash} FROM {source} s").format(
                key=emb.key, hash=emb.input_hash_expr("s"), source=emb.source
            ) + where,
            (keys,) if keys is not None else None,
        ).fetchall()
    )


def _graphsage(
    conn: psycopg.Connection, emb: Embedding, advance: Advance
) -> tuple[dict[str, int], dict[str, Any]]:
    """Every node's vector from the current model (a forward pass over the whole graph)."""
    spec = emb.spec
    assert isinstance(spec, GraphEmbeddingSpec) and spec.graph is not None
    clock = time.perf_counter()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        version = models.ensure_model(conn, emb)
        encoder = models.ModelCache().get(conn, emb, version)
        if not isinstance(encoder, GraphSAGEEncoder):
            raise InputError(None, f"embedding {emb.name!r}: model version {version} is not a GraphSAGE model")
        graph = read_graph(conn, emb, spec.graph)
        hashes = _input_hashes(conn, emb)
        read_seconds = time.perf_counter() - clock
        n = len(graph.keys)
        advance(0, f"GraphSAGE over {n} nodes, {len(graph.src)} edges", n)
        clock = time.perf_counter()
        vectors = encoder.embed(_local(graph, spec.graph), np.arange(n)) if n else np.zeros((0, spec.dim))
        compute_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        written = 0
        for start in range(0, n, CHUNK_ROWS):
            keys = graph.keys[start : start + CHUNK_ROWS]
            written += sink.upsert(conn, emb, keys, vectors[start : start + CHUNK_ROWS], version,
                                   [hashes.get(k) for k in keys])
            advance(start + len(keys), "writing")
        deleted = sink.delete_orphans(conn, emb)
    counts = {"embedded": written, "unchanged": n - written, "deleted": deleted, "nodes": n, "model_version": version}
    details = {
        "mode": "full",
        "nodes": n,
        "edges": len(graph.src),
        "skipped_edges": graph.skipped_edges,
        "model_version": version,
        "read_seconds": round(read_seconds, 3),
        "compute_seconds": round(compute_seconds, 3),
        "write_seconds": round(time.perf_counter() - clock, 3),
    }
    return counts, details


def read_neighbourhoods(conn: psycopg.Connection, emb: Embedding, keys: list[str]) -> pd.DataFrame:
    """The batch frame of a GraphSAGE queue batch: the nodes among ``keys`` that exist, with the
    local graph of everything their vectors depend on (``layers`` hops of edges, node features)."""
    spec = emb.spec
    assert isinstance(spec, GraphEmbeddingSpec) and spec.graph is not None and spec.encoder is not None
    graph_spec = spec.graph
    hashes = _input_hashes(conn, emb, list(keys))
    targets = [k for k in keys if k in hashes]
    nodes = list(targets)
    known = set(nodes)
    edges: dict[str, tuple[str, str]] = {}
    frontier = targets
    for _ in range(spec.encoder.layers):
        if not frontier:
            break
        found = _edges_between_nodes(conn, emb, graph_spec, frontier)
        fresh = [(ident, s, t) for ident, s, t in found if ident not in edges]
        frontier = []
        for ident, source, target in fresh:
            edges[ident] = (source, target)
            for end in (source, target):
                if end not in known:
                    known.add(end)
                    nodes.append(end)
                    frontier.append(end)
    _, features = _read_nodes(conn, emb, graph_spec, nodes)
    position = {k: i for i, k in enumerate(nodes)}
    ends = np.array([(position[s], position[t]) for s, t in edges.values()], dtype=np.int64).reshape(-1, 2)
    local = LocalGraph.from_edges(
        features if features is not None else np.zeros((len(nodes), 0)), ends[:, 0], ends[:, 1],
        graph_spec.orientation,
    )
    frame = frame_of(local, targets, np.arange(len(targets)), sources.KEY)
    frame[sources.HASH] = [hashes[k] for k in targets]
    return frame


def _edges_between_nodes(
    conn: psycopg.Connection, emb: Embedding, graph: GraphSpec, keys: list[str]
) -> list[tuple[str, str, str]]:
    """(row identity, source, target) of every edge with an end among ``keys`` whose both ends are
    nodes (dangling edges are left out, as in a full run)."""
    return conn.execute(
        sql.SQL(
            "SELECT e.ctid::text, e.{s}::text, e.{t}::text FROM {edges} e "
            "JOIN {source} a ON a.{key} = e.{s} JOIN {source} b ON b.{key} = e.{t} "
            "WHERE e.{s} = ANY(CAST(%(k)s AS {karr})) OR e.{t} = ANY(CAST(%(k)s AS {karr}))"
        ).format(
            s=sql.Identifier(graph.source_column),
            t=sql.Identifier(graph.target_column),
            edges=_edges_table(emb, graph),
            source=emb.source,
            key=emb.key,
            karr=emb.key_array_type,
        ),
        {"k": keys},
    ).fetchall()
