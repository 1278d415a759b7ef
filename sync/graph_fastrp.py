"""Native FastRP over edges held in Postgres, kept fresh from change capture.

Triggers on the node and edge tables log what changed (``vectorsync.graph_changes``, migration
0011) and NOTIFY. A run with nothing logged since the last one does no graph work. A process that
ran the last sync keeps the graph and every FastRP iteration in memory (the worker does) and
applies the logged changes incrementally, recomputing only the nodes a change can reach and writing
only vectors that moved; otherwise the run reads the whole graph and computes it (``details.mode``:
``unchanged``, ``incremental`` or ``full``). Each run is one REPEATABLE READ transaction, so readers
see the previous run's vectors or the new ones, and the change log it consumes is exactly the one
its snapshot saw; it is recorded in ``vectorsync.runs`` with its counts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from vectorsync.encoders.fastrp import Edges, FastRPParams, IncrementalFastRP
from vectorsync.errors import InputError
from vectorsync.sync import models, queue, sink
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.graph_store import (
    Advance,
    edges_of,
    graph_state,
    model_version,
    node_ids,
    read_graph,
    read_nodes,
    save_state,
    target_intact,
    upsert_chunks,
)
from vectorsync.sync.spec import GraphEmbeddingSpec, GraphSpec

log = logging.getLogger(__name__)

#: The version of this module's FastRP; bumping it re-embeds every native graph.
FASTRP_IMPLEMENTATION = 2


#: More logged changes than this are applied by reading the whole graph again.
MAX_INCREMENTAL_CHANGES = 200_000


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


def run(
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
            state = graph_state(conn, emb)
            changes = queue.count_graph_changes(conn, emb.name, MAX_INCREMENTAL_CHANGES + 1)
            # the stored vectors are what the last run left (nobody emptied the target meanwhile)
            unchanged = (
                state is not None
                and state["params"] == params
                and state["model_version"] == models.current_version(conn, emb.name)
                and target_intact(conn, emb, state["nodes"])
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
            queue.clear_graph_changes(conn, emb.name)
            save_state(conn, emb, counts["model_version"], params, counts["nodes"], run_id)
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
    written = upsert_chunks(conn, emb, graph.keys, vectors, version, advance)
    deleted = sink.delete_orphans(conn, emb)
    if rebuild:
        from vectorsync.sync.bulk import create_index

        create_index(conn, emb)
    timings["write_seconds"] = time.perf_counter() - clock
    log.info("embedding %s: full FastRP run over %d nodes, %d vectors written", emb.name, n, written)
    counts = {"embedded": written, "unchanged": n - written, "deleted": deleted, **graph.figures(version)}
    details = {
        "mode": "full",
        **graph.figures(version),
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
    rows = queue.graph_changes(conn, emb.name)
    if any(kind == "all" for kind, *_ in rows):
        log.info("embedding %s: a node or edge table was truncated; reading the whole graph again", emb.name)
        return None
    touched = sorted({source for kind, source, _, _ in rows if kind == "node"})
    present, features = read_nodes(conn, emb, graph_spec, touched)
    touched_set = set(touched)
    new_keys = [k for k in touched if k not in cached.positions]
    state = cached.state
    for key, position in zip(new_keys, state.add_nodes(node_ids(emb, new_keys)), strict=True):
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
    current = [("edge+", s, t, w) for s, t, w in edges_of(conn, emb, graph_spec, sorted(present))]
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
    written = upsert_chunks(conn, emb, keys, state.embedding(written_positions), cached.version, advance)
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


def _edges(edges: list[tuple[int, int, float]], weighted: bool) -> Edges:
    if not edges:
        return Edges.empty()
    table = np.array(edges, dtype=np.float64)
    return Edges(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2] if weighted else None)
