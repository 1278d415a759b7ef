"""Graph embeddings: one run of a graph spec (native FastRP, native GraphSAGE or the Neo4j bridge),
the worker's graph runs, and the bridge's copy of Neo4j vectors.

The rooms of a graph run: ``graph_store`` reads the graph held in Postgres and holds what every
kind of run shares (model versions, the run state, the chunked write); ``graph_fastrp`` computes
native FastRP, in full or incrementally from the change log; ``graph_sage`` trains GraphSAGE and
embeds the whole graph or a queue batch's neighbourhoods; the change log's statements live with the
queue's (``queue.graph_changes`` and friends).

The bridge's scheduled runs skip work when the Neo4j graph did not change (same fingerprint:
node and relationship counts and largest ids) and say so in the run's details.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from vectorsync.sync import graph_fastrp, graph_sage, models, queue, sink
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.graph_store import Advance, graph_state, lock, model_version, save_state, target_intact
from vectorsync.sync.neo4j_bridge import BridgeError, fingerprint, stream_embeddings
from vectorsync.sync.progress import Progress
from vectorsync.sync.spec import GraphEmbeddingSpec

log = logging.getLogger(__name__)

_SEEN = sql.Identifier("vectorsync_graph_seen")


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
            counts, details = graph_sage.run(conn, emb, advance)
        else:
            counts, details = graph_fastrp.run(conn, emb, advance, run_id)
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
            due = {s.name: s for s in self.native if queue.graph_changes_pending(self._conn, s.name)}
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
        state = graph_state(conn, emb)
        if (
            state is not None
            and state["params"] == json.loads(json.dumps(made_from, default=str))
            and state["model_version"] == models.current_version(conn, emb.name)
            and target_intact(conn, emb, state["nodes"])
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
        lock(conn, emb)
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
            save_state(conn, emb, version, made_from, seen, run_id)
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
