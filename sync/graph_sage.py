"""Native GraphSAGE over edges and node features held in Postgres: training on the whole graph
(``vectorsync train``), a forward pass over the whole graph (``sync``), and the local neighbourhoods
a queue batch of new or changed nodes needs, so the worker embeds them with the current model
without retraining.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.base import Progress as TrainingProgress
from vectorsync.encoders.graphsage import GraphSAGEEncoder, LocalGraph, frame_of
from vectorsync.errors import InputError
from vectorsync.sync import generations, models, sink, sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.graph_store import Advance, Graph, edges_table, read_graph, read_nodes, upsert_chunks
from vectorsync.sync.spec import GraphEmbeddingSpec, GraphSpec


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


def _local(graph: Graph, graph_spec: GraphSpec, labels: np.ndarray | None = None) -> LocalGraph:
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


def run(
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
        written = upsert_chunks(conn, emb, graph.keys, vectors, version, advance, hashes)
        deleted = sink.delete_orphans(conn, emb)
    counts = {"embedded": written, "unchanged": n - written, "deleted": deleted, "nodes": n, "model_version": version}
    details = {
        "mode": "full",
        **graph.figures(version),
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
    _, features = read_nodes(conn, emb, graph_spec, nodes)
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
            edges=edges_table(emb, graph),
            source=emb.source,
            key=emb.key,
            karr=emb.key_array_type,
        ),
        {"k": keys},
    ).fetchall()
