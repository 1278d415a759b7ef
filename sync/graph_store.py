"""Reading a graph held in Postgres, and what every graph run shares.

``read_graph`` reads nodes, edges and features in one snapshot (node ``i`` is the ``i``-th key in
key order, so the same data always gives bit-identical vectors); ``read_nodes`` / ``edges_of`` read
the few nodes and edges an incremental run or a queue batch needs.

Model versions: a native FastRP or bridge embedding has no trained weights, but its vectors are only
comparable when they were made with the same parameters. Each distinct parameter set is registered
once in ``vectorsync.models`` with empty weights (``model_version``); runs with the same parameters
reuse that version, and changing a parameter makes a new version current, which rewrites every
vector once. ``vectorsync.graph_state`` records what the last run left (parameters, version, node
count, run id), so a run with nothing to do can say so after one catalogue query.

Edges whose source or target is not a node key (a deleted node whose edges remain, say) are left
out of the graph, with a warning and a count in the run's details: a continuously synced graph must
survive them. When no edge at all matches a node, the columns are wrong and the run stops with an
error naming the table, column and an example value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.fastrp import node_keys
from vectorsync.errors import InputError
from vectorsync.sync import models, sink
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.db import scalar
from vectorsync.sync.spec import GraphSpec, split_qualified

log = logging.getLogger(__name__)

#: Vectors per ``sink.upsert`` call (one binary COPY each).
CHUNK_ROWS = 20_000


_INTEGER_KEYS = {"smallint", "integer", "bigint"}


_NODES = sql.Identifier("vectorsync_graph_nodes")


#: ``advance(done, info, total=None)`` moves the progress bar.
Advance = Callable[..., None]


@dataclass
class Graph:
    keys: list[str]
    ids: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    weights: np.ndarray | None
    features: np.ndarray | None
    edge_rows: int
    skipped_edges: int

    def figures(self, version: int) -> dict[str, Any]:
        """What every graph run reports about the graph it read."""
        return {"nodes": len(self.keys), "edges": len(self.src), "skipped_edges": self.skipped_edges,
                "model_version": version}


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


def upsert_chunks(
    conn: psycopg.Connection,
    emb: Embedding,
    keys: list[str],
    vectors: np.ndarray,
    version: int,
    advance: Advance,
    hashes: dict[str, str] | None = None,
) -> int:
    written = 0
    for start in range(0, len(keys), CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, len(keys))
        chunk = keys[start:stop]
        digests = [hashes.get(k) for k in chunk] if hashes is not None else None
        written += sink.upsert(conn, emb, chunk, vectors[start:stop], version, digests)
        advance(stop, "writing")
    return written


def lock(conn: psycopg.Connection, emb: Embedding) -> None:
    """One run of an embedding at a time (a CLI sync next to a scheduled worker run waits)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('vectorsync.graph:' || %s, 0))", (emb.name,))


def graph_state(conn: psycopg.Connection, emb: Embedding) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT model_version, params, nodes, serial FROM vectorsync.graph_state WHERE embedding = %s", (emb.name,)
    ).fetchone()
    return None if row is None else dict(zip(("model_version", "params", "nodes", "serial"), row, strict=True))


def save_state(
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


def target_intact(conn: psycopg.Connection, emb: Embedding, nodes: int) -> bool:
    """Whether the target still holds vectors when the last run left ``nodes`` of them. Counting
    the rows would read the whole table (seconds at a million vectors) on every run with nothing to
    do; a target emptied by hand (or by a rollback to an empty generation) is what happens in
    practice, and a node whose vector was deleted alone gets it back when the node changes."""
    has_rows = bool(scalar(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(emb.target)))
    return has_rows == (nodes > 0)


def edges_table(emb: Embedding, graph: GraphSpec) -> sql.Identifier:
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


def read_graph(conn: psycopg.Connection, emb: Embedding, graph: GraphSpec) -> Graph:
    """Nodes, edges and features (call inside a REPEATABLE READ transaction, for one consistent
    snapshot). Node ``i`` is the ``i``-th key in key order, so the same data always gives the same
    sparse matrix and bit-identical vectors."""
    edges = edges_table(emb, graph)
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
    return Graph(keys, node_ids(emb, keys), src, dst, weights, matrix, edge_rows, skipped)


def node_ids(emb: Embedding, keys: list[str]) -> np.ndarray:
    """FastRP's stable per-node integer keys for the text form of Postgres keys."""
    if emb.key_type in _INTEGER_KEYS:
        return node_keys(pd.Series(keys, dtype=str).astype(np.int64).to_numpy())
    return node_keys(keys)


def read_nodes(
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


def edges_of(
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
            edges=edges_table(emb, graph),
            karr=emb.key_array_type,
        ),
        {"k": keys},
    ).fetchall()


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
