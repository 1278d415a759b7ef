"""Graph embeddings: native FastRP compute time and write rate, and the Neo4j bridge's throughput.

- FastRP: a generated graph (1M nodes, 5M edges; quick: 100k / 500k), dim 128, 3 iterations, on the
  cores this machine has. ``compute`` is the FastRP call alone (target ≤ 10 s for 1M / 5M on 2 cores).
- Write rate: ``vectorsync sync`` of that graph into an unindexed pgvector table (vectors/s of the
  write phase: COPY into the staging table and the skip-unchanged upsert) vs a raw binary COPY of the
  same vectors into a fresh unindexed table, measured in the same run.
- Live graph: the same generated graph with edge weights, kept fresh from change capture. ``full``
  is the first sync (read + FastRP + write, which also builds the worker's in-memory state); then
  a sync with nothing changed, and a sync applying 1,000 random edge changes (inserts, deletes,
  weight updates) through the incremental path (target ≤ 2 s at 1M / 5M), both against the full
  sync of the same run. Run with ``GRAPH_GENERATOR=uniform`` for a graph without hubs: on the
  default power-law graph, 1,000 changes reach most nodes within 3 iterations, so the run falls back
  to a full recompute and says so (``mode``).
- GraphSAGE, inductive: a generated 100k-node graph (quick: 20k) with 16 numeric features and
  indexed edge columns, a model trained for one epoch, every node embedded; then, with an idle
  ``vectorsync worker``, new nodes inserted with 5 edges each: seconds from the commit until the new
  node's vector is stored (target ≤ 1 s), against a whole-graph forward pass of the same run.
- Bridge: stored node vectors (dim 128) on a real Bolt server (ArcadeDB from ``arcadedb-embedded``),
  a few thousand nodes: node embeddings/s of a whole bridge run into pgvector vs the neo4j driver's
  own read rate of the same query's data, in the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
from pgvector.psycopg import register_vector

from benchmarks.common import Figure, scratch_database, timer

DIM = 128
ITERATION_WEIGHTS = [0.0, 1.0, 1.0]


def generate(
    conn: psycopg.Connection, nodes: int, edges: int, seed: int = 0, *, weighted: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``nodes(id bigint)`` and ``edges(source, target[, weight])``; targets skewed towards low ids
    (hubs), or uniform with ``GRAPH_GENERATOR=uniform``."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    rng = np.random.default_rng(seed)
    src = rng.integers(0, nodes, edges)
    if os.environ.get("GRAPH_GENERATOR") == "uniform":
        dst = rng.integers(0, nodes, edges)
    else:
        dst = np.minimum((rng.pareto(1.5, edges) * nodes / 50).astype(np.int64), nodes - 1)
    conn.execute("CREATE TABLE nodes (id bigint PRIMARY KEY)")
    conn.execute("INSERT INTO nodes SELECT generate_series(0, %s)", (nodes - 1,))
    frame = pd.DataFrame({"source": src, "target": dst})
    if weighted:
        frame["weight"] = rng.uniform(0.5, 2.0, edges).round(3)
    conn.execute(
        "CREATE TABLE edges (source bigint NOT NULL, target bigint NOT NULL"
        + (", weight float8 NOT NULL)" if weighted else ")")
    )
    buffer = BytesIO()
    frame.to_csv(buffer, sep="\t", header=False, index=False)
    with conn.cursor().copy(f"COPY edges ({', '.join(frame.columns)}) FROM STDIN") as copy:
        copy.write(buffer.getvalue())
    conn.execute("ANALYZE nodes")
    conn.execute("ANALYZE edges")
    return src, dst


def raw_copy_seconds(url: str, vectors: np.ndarray) -> float:
    """Binary COPY of ``vectors`` (keys 0..n-1) into a fresh unindexed table: the least any writer does."""
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute(f"CREATE TABLE raw_vectors (id bigint PRIMARY KEY, embedding vector({vectors.shape[1]}))")
        conn.commit()
        with timer() as elapsed:
            with conn.cursor().copy("COPY raw_vectors (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "vector"])
                for i, vector in enumerate(vectors):
                    copy.write_row((i, vector))
            conn.commit()
        conn.execute("DROP TABLE raw_vectors")
        conn.commit()
    return elapsed[0]


def fastrp_figures(data_dir: Path, quick: bool) -> list[Figure]:
    from vectorsync.encoders.fastrp import fastrp
    from vectorsync.sync import catalog, schema
    from vectorsync.sync.graph import sync_graph
    from vectorsync.sync.spec import parse_config

    nodes, edges = (100_000, 500_000) if quick else (1_000_000, 5_000_000)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        src, dst = generate(conn, nodes, edges)
        with timer() as compute:
            vectors = fastrp(nodes, src, dst, dim=DIM, iteration_weights=ITERATION_WEIGHTS, node_ids=np.arange(nodes))
        raw_seconds = raw_copy_seconds(url, vectors)
        del vectors
        config = parse_config(
            {
                "embeddings": [
                    {
                        "name": "generated",
                        "table": "nodes",
                        "key": "id",
                        "modality": "graph",
                        "dim": DIM,
                        "index": "none",
                        "graph": {"edges": "edges", "iteration_weights": ITERATION_WEIGHTS},
                    }
                ]
            }
        )
        schema.upgrade(url, config)
        emb = catalog.load(conn, config.embeddings[0])
        with timer() as whole:
            counts = sync_graph(conn, emb)
        assert counts["embedded"] == nodes, counts
        details = conn.execute("SELECT details FROM vectorsync.runs WHERE id = %s", (counts["run_id"],)).fetchone()[0]
        with timer() as again:
            repeat = sync_graph(conn, emb)
        assert repeat["embedded"] == 0 and repeat["unchanged"] == nodes, repeat
    size = f"{nodes:,} nodes, {edges:,} edges, dim {DIM}, {len(ITERATION_WEIGHTS)} iterations, {cores} cores"
    return [
        Figure("graph fastrp", f"compute seconds, {size}", compute[0], "s", target="≤ 10 s (1M/5M, 2 cores)"),
        Figure("graph fastrp", "compute seconds inside vectorsync sync", details["compute_seconds"], "s",
               "standalone fastrp()", compute[0]),
        Figure("graph fastrp", "vectors/s written to pgvector (sync write phase, no index)",
               nodes / details["write_seconds"], "vectors/s", "raw binary COPY", nodes / raw_seconds),
        Figure("graph fastrp", "vectors/s, whole first sync (read + compute + write)", nodes / whole[0], "vectors/s",
               "raw binary COPY", nodes / raw_seconds),
        Figure("graph fastrp", "seconds, second sync (nothing changed, nothing written)", again[0], "s",
               "first sync", whole[0]),
    ]


def live_figures(data_dir: Path, quick: bool) -> list[Figure]:
    from vectorsync.sync import catalog, schema
    from vectorsync.sync.graph import sync_graph
    from vectorsync.sync.spec import parse_config

    nodes, edges = (100_000, 500_000) if quick else (1_000_000, 5_000_000)
    changes = 1_000
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        config = parse_config(
            {
                "embeddings": [
                    {
                        "name": "live",
                        "table": "nodes",
                        "key": "id",
                        "modality": "graph",
                        "dim": DIM,
                        "index": "none",
                        "graph": {"edges": "edges", "weight_column": "weight", "iteration_weights": ITERATION_WEIGHTS},
                    }
                ]
            }
        )
        generate(conn, nodes, edges, weighted=True)
        schema.upgrade(url, config)
        emb = catalog.load(conn, config.embeddings[0])
        with timer() as full:
            first = sync_graph(conn, emb)
        assert first["embedded"] == nodes, first
        with timer() as idle:
            idle_run = sync_graph(conn, emb)
        assert idle_run["embedded"] == 0, idle_run
        rng = np.random.default_rng(9)
        rounds = []
        for _ in range(2):  # the second round comes right after the first: fewer pages first touched since a checkpoint
            _change_edges(conn, rng, nodes, changes)
            wal_before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            with timer() as applied:
                run = sync_graph(conn, emb)
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (wal_before,)).fetchone()[0]
            details = conn.execute("SELECT details FROM vectorsync.runs WHERE id = %s", (run["run_id"],)).fetchone()[0]
            rounds.append((applied[0], run, details, float(wal) / 1e6))
    generator = os.environ.get("GRAPH_GENERATOR", "power-law")
    size = f"{nodes:,} nodes, {edges:,} edges ({generator}), dim {DIM}, {len(ITERATION_WEIGHTS)} iterations"
    return [
        Figure("graph live", f"seconds, sync with nothing changed, {size}", idle[0], "s", "full sync", full[0],
               target="≤ 1 s (1M/5M)"),
        *[
            Figure("graph live", f"seconds, sync applying {changes:,} edge changes, {label} (mode {details['mode']}, "
                   f"recomputed per iteration {details.get('recomputed')}, {run['embedded']:,} vectors written; "
                   f"read {details.get('read_seconds')} s, compute {details.get('compute_seconds')} s, "
                   f"write {details.get('write_seconds')} s, WAL {wal:,.0f} MB)",
                   seconds, "s", "full sync", full[0], target="≤ 2 s (1M/5M)")
            for label, (seconds, run, details, wal) in zip(("first round", "second round"), rounds, strict=True)
        ],
    ]


def _change_edges(conn: psycopg.Connection, rng: np.random.Generator, nodes: int, changes: int) -> None:
    """``changes`` random edge changes: 40 % inserts, 30 % deletes, 30 % weight updates."""
    inserted, deleted = changes * 2 // 5, changes * 3 // 10
    updated = changes - inserted - deleted
    conn.execute(
        "INSERT INTO edges SELECT s, t, 1.0 FROM unnest(%s::bigint[], %s::bigint[]) AS e(s, t)",
        (rng.integers(0, nodes, inserted).tolist(), rng.integers(0, nodes, inserted).tolist()),
    )
    conn.execute("DELETE FROM edges WHERE ctid IN (SELECT ctid FROM edges TABLESAMPLE SYSTEM (1) LIMIT %s)", (deleted,))
    conn.execute(
        "UPDATE edges SET weight = weight * 1.5 WHERE ctid IN (SELECT ctid FROM edges TABLESAMPLE SYSTEM (1) LIMIT %s)",
        (updated,),
    )


def graphsage_figures(data_dir: Path, quick: bool) -> list[Figure]:
    import subprocess
    import sys

    from vectorsync.sync import catalog, schema
    from vectorsync.sync.graph import sync_graph
    from vectorsync.sync.graph_sage import train_graphsage
    from vectorsync.sync.spec import parse_config

    nodes, edges, inserts = (20_000, 100_000, 10) if quick else (100_000, 500_000, 20)
    raw = {
        "embeddings": [
            {
                "name": "sage",
                "table": "people",
                "key": "id",
                "modality": "graph",
                "dim": 64,
                "index": "none",
                "encoder": {"type": "graphsage", "epochs": 1},
                "graph": {"edges": "knows", "feature_columns": ["features"]},
            }
        ]
    }
    rng = np.random.default_rng(4)
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE people (id bigint PRIMARY KEY, features real[] NOT NULL)")
        conn.execute(
            "INSERT INTO people SELECT i, ARRAY(SELECT random() FROM generate_series(1, 16) WHERE i >= 0) "
            "FROM generate_series(0, %s) i",
            (nodes - 1,),
        )
        conn.execute("CREATE TABLE knows (source bigint NOT NULL, target bigint NOT NULL)")
        conn.execute(
            "INSERT INTO knows SELECT * FROM unnest(%s::bigint[], %s::bigint[])",
            (rng.integers(0, nodes, edges).tolist(), rng.integers(0, nodes, edges).tolist()),
        )
        conn.execute("CREATE INDEX ON knows (source)")
        conn.execute("CREATE INDEX ON knows (target)")
        conn.execute("ANALYZE")
        config = parse_config(raw)
        schema.upgrade(url, config)
        emb = catalog.load(conn, config.embeddings[0])
        train_graphsage(conn, emb)
        conn.execute("TRUNCATE vectorsync.queue")
        with timer() as whole:
            sync_graph(conn, emb)
        config_path = data_dir / "sage.toml"
        config_path.write_text(
            "[[embeddings]]\nname = 'sage'\ntable = 'people'\nkey = 'id'\nmodality = 'graph'\ndim = 64\n"
            "index = 'none'\nencoder = { type = 'graphsage', epochs = 1 }\n\n[embeddings.graph]\n"
            "edges = 'knows'\nfeature_columns = ['features']\n"
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "--config", str(config_path), "worker", "sage"],
            env={**os.environ, "VECTORSYNC_DATABASE_URL": url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        latencies = []
        try:
            started = time.monotonic()  # an idle worker: started, its model loaded, listening
            while not conn.execute("SELECT count(*) FROM vectorsync.workers WHERE status = 'running'").fetchone()[0]:
                assert time.monotonic() - started < 300 and worker.poll() is None, "the worker did not start"
                time.sleep(0.2)
            conn.execute("INSERT INTO people SELECT %s, ARRAY(SELECT random() FROM generate_series(1, 16))", (-1,))
            while not conn.execute("SELECT 1 FROM sage_embeddings WHERE id = -1").fetchone():
                assert time.monotonic() - started < 300, "the worker embedded nothing"
                time.sleep(0.05)
            time.sleep(1.0)
            for i in range(inserts):
                key = nodes + i
                with conn.transaction():
                    conn.execute("INSERT INTO people SELECT %s, ARRAY(SELECT random() FROM generate_series(1, 16))",
                                 (key,))
                    conn.execute("INSERT INTO knows SELECT %s, t FROM unnest(%s::bigint[]) t",
                                 (key, rng.integers(0, nodes, 5).tolist()))
                committed = time.perf_counter()
                deadline = committed + 30
                while time.perf_counter() < deadline:
                    if conn.execute("SELECT 1 FROM sage_embeddings WHERE id = %s", (key,)).fetchone():
                        latencies.append(time.perf_counter() - committed)
                        break
                    time.sleep(0.005)
                time.sleep(0.5)
        finally:
            worker.terminate()
            worker.wait(30)
    assert len(latencies) == inserts, f"{inserts - len(latencies)} new nodes got no vector within 30 s"
    size = f"{nodes:,} nodes, {edges:,} edges, 16 features, dim 64, 2 layers"
    return [
        Figure("graph graphsage", f"new node → vector p50, idle worker, {size}", float(np.median(latencies)), "s",
               "whole-graph GraphSAGE sync", whole[0], target="≤ 1 s"),
        Figure("graph graphsage", "new node → vector max", float(np.max(latencies)), "s",
               "whole-graph GraphSAGE sync", whole[0]),
    ]


def _load_bolt(run: Callable[..., object], label: str, keys: list[int], vectors: np.ndarray) -> None:
    for start in range(0, len(keys), 500):
        rows = [{"key": keys[i], "emb": vectors[i].tolist()} for i in range(start, min(start + 500, len(keys)))]
        run(f"UNWIND $rows AS r CREATE (n:{label}) SET n = r", rows=rows)


def bridge_figures(data_dir: Path, quick: bool) -> list[Figure]:
    import neo4j

    from tests.bolt_server import start_arcadedb
    from vectorsync.sync import catalog, schema
    from vectorsync.sync.graph import sync_graph
    from vectorsync.sync.spec import parse_config

    count = 2_000 if quick else 5_000
    label = "Bench"
    vectors = np.random.default_rng(2).normal(size=(count, DIM))
    password_env = "VECTORSYNC_BENCH_BOLT_PASSWORD"
    with (
        tempfile.TemporaryDirectory() as bolt_root,
        start_arcadedb(Path(bolt_root)) as (uri, user, password, database),
        neo4j.GraphDatabase.driver(uri, auth=(user, password)) as driver,
    ):
        os.environ[password_env] = password

        def run(query: str, **params: object) -> list[dict[str, object]]:
            with driver.session(database=database) as session:
                return [r.data() for r in session.run(query, params)]

        _load_bolt(run, label, list(range(count)), vectors)
        query = f"MATCH (n:{label}) RETURN n.key AS key, n.emb AS embedding"
        run(query)  # warm the server's caches for both readers alike
        with timer() as driver_read:
            with driver.session(database=database, fetch_size=10_000) as session:
                rows = [(r[0], r[1]) for r in session.run(query)]
        assert len(rows) == count
        with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_nodes (key bigint PRIMARY KEY)")
            config = parse_config(
                {
                    "embeddings": [
                        {
                            "name": "bridged",
                            "table": "bench_nodes",
                            "key": "key",
                            "modality": "graph",
                            "dim": DIM,
                            "index": "none",
                            "neo4j": {"uri": uri, "user": user, "password_env": password_env, "database": database,
                                      "label": label, "key_property": "key", "property": "emb"},
                        }
                    ]
                }
            )
            schema.upgrade(url, config)
            emb = catalog.load(conn, config.embeddings[0])
            started = time.perf_counter()
            counts = sync_graph(conn, emb)
            bridge_seconds = time.perf_counter() - started
            assert counts["embedded"] == count, counts
            started = time.perf_counter()
            repeat = sync_graph(conn, emb)
            repeat_seconds = time.perf_counter() - started
            assert repeat["unchanged"] == count, repeat
        os.environ.pop(password_env, None)
    return [
        Figure("graph bridge", f"node embeddings/s, Bolt (ArcadeDB) → pgvector, {count:,} nodes, dim {DIM}",
               count / bridge_seconds, "nodes/s", "neo4j driver read alone", count / driver_read[0]),
        Figure("graph bridge", "node embeddings/s, second run (all unchanged)", count / repeat_seconds, "nodes/s",
               "neo4j driver read alone", count / driver_read[0]),
    ]


def run(data_dir: Path, quick: bool) -> list[Figure]:
    return (
        fastrp_figures(data_dir, quick)
        + live_figures(data_dir, quick)
        + graphsage_figures(data_dir, quick)
        + bridge_figures(data_dir, quick)
    )
