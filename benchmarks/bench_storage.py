"""Quantized storage: ``vector`` against ``halfvec`` and ``bit`` on the same vectors, in one run.

100k vectors (20k with --quick) of dimension 384, like MiniLM's: unit length, in topic clusters
around a direction they all share. One source table carries three embeddings that differ only in
``storage``; each is loaded with the sink's binary COPY and then indexed (HNSW at the spec's
defaults) as a backfill is. For each storage: table and index size, index build time, recall@10 of
``vectorsync.nearest_to`` against exact search (numpy, float32) and the median query latency, each
compared with ``vector`` storage measured in the same run (and exact search's latency with it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from benchmarks.common import Figure, scratch_database, timer
from vectorsync.sync import catalog, schema, sink
from vectorsync.sync.bulk import create_index, drop_index
from vectorsync.sync.spec import parse_config

NAME = "storage"
DIM = 384
K = 10
STORAGES = ("vector", "halfvec", "bit")


def minilm_like(n: int, seed: int, centers: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Unit vectors near one of ``centers``, all leaning towards ``shared``: cosine about 0.45 within
    a topic and 0.1 across topics, as sentence embeddings are."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, DIM)) * (1.2 / np.sqrt(DIM))
    x = 0.5 * shared + centers[rng.integers(0, len(centers), n)] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(data: np.ndarray, queries: np.ndarray) -> list[set[str]]:
    """The K nearest rows of each query by cosine distance (the vectors are unit length)."""
    return [set(np.argsort(-(data @ q))[:K].astype(str)) for q in queries]


def load(url: str, data: np.ndarray) -> dict[str, float]:
    """Table ``docs`` and one embedding per storage, loaded then indexed; returns build seconds."""
    rows = len(data)
    config = parse_config({"embeddings": [
        {"name": f"docs_{s}", "table": "docs", "key": "id", "modality": "tabular", "dim": DIM, "storage": s,
         "columns": ["topic"]}
        for s in STORAGES
    ]})
    builds: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, topic integer)")
        conn.execute("INSERT INTO docs SELECT g, g %% 100 FROM generate_series(0, %s) g", (rows - 1,))
        schema.upgrade(url, config)
        conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
        for spec in config.embeddings:
            emb = catalog.load(conn, spec)
            drop_index(conn, emb)
            with conn.transaction():
                for start in range(0, rows, 10_000):
                    chunk = data[start:start + 10_000]
                    sink.upsert(conn, emb, [str(i) for i in range(start, start + len(chunk))], chunk, 1)
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(emb.target))
            with timer() as build:
                create_index(conn, emb)
            builds[spec.storage] = build[0]
        conn.execute("UPDATE vectorsync.embeddings SET current_version = 1")
    return builds


def sizes(conn: psycopg.Connection, storage: str) -> tuple[float, float]:
    """(table MB, index MB) of the storage's generation table and its vector index."""
    row = conn.execute(
        "SELECT pg_table_size(c.oid), "
        "coalesce(sum(pg_relation_size(i.indexrelid)) FILTER (WHERE NOT i.indisprimary), 0) "
        "FROM pg_class c LEFT JOIN pg_index i ON i.indrelid = c.oid WHERE c.oid = %s::regclass GROUP BY c.oid",
        (f"vectorsync.docs_{storage}_g1",),
    ).fetchone()
    assert row is not None
    return row[0] / 2**20, row[1] / 2**20


def run(data_dir: Path, quick: bool) -> list[Figure]:
    rows, queries = (20_000, 50) if quick else (100_000, 200)
    rng = np.random.default_rng(0)
    shared = rng.normal(size=DIM)
    shared /= np.linalg.norm(shared)
    centers = rng.normal(size=(rows // 200, DIM))  # a topic holds about 200 rows
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    data = minilm_like(rows, 1, centers, shared)
    probes = minilm_like(queries, 2, centers, shared)
    truth = exact_top(data, probes)
    measured: dict[str, dict[str, float]] = {}
    with scratch_database(data_dir) as url:
        builds = load(url, data)
        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            latencies: dict[str, list[float]] = {s: [] for s in (*STORAGES, "exact")}
            hits = dict.fromkeys(STORAGES, 0)
            exact_sql = conn.execute(
                "SELECT vectorsync._search_sql(vectorsync._embedding('docs_vector'), '{}', exact => true)"
            ).fetchone()
            assert exact_sql is not None
            exact_query = exact_sql[0].replace("$1", "%(q)s").replace("$2", "NULL").replace("$3", str(K))
            for _ in range(2):  # warm the caches: every storage answers from memory, as in service
                for storage in STORAGES:
                    conn.execute("SELECT count(*) FROM vectorsync.nearest_to(%s, %s, %s)",
                                 (f"docs_{storage}", probes[0], K))
            for q, expected in zip(probes, truth, strict=True):
                for storage in STORAGES:  # interleaved, so the machine's load falls on each alike
                    started = time.perf_counter()
                    got = conn.execute("SELECT key FROM vectorsync.nearest_to(%s, %s, %s)",
                                       (f"docs_{storage}", q, K)).fetchall()
                    latencies[storage].append(time.perf_counter() - started)
                    hits[storage] += len({k for (k,) in got} & expected)
                started = time.perf_counter()
                conn.execute(exact_query, {"q": q}).fetchall()
                latencies["exact"].append(time.perf_counter() - started)
            for storage in STORAGES:
                table_mb, index_mb = sizes(conn, storage)
                measured[storage] = {
                    "table": table_mb, "index": index_mb, "build": builds[storage],
                    "recall": 100 * hits[storage] / (queries * K),
                    "latency": float(np.median(latencies[storage])) * 1000,
                }
            exact_ms = float(np.median(latencies["exact"])) * 1000
    base = measured["vector"]
    figures: list[Figure] = []
    for storage, m in measured.items():
        against = "vector storage"
        targets = {"table": "about 0.5" if storage == "halfvec" else None,
                   "recall": "within 1 point of vector" if storage == "halfvec" else None}
        figures += [
            Figure(NAME, f"{storage}: table size", m["table"], "MB", against, base["table"], targets["table"]),
            Figure(NAME, f"{storage}: index size", m["index"], "MB", against, base["index"]),
            Figure(NAME, f"{storage}: index build", m["build"], "s", against, base["build"]),
            Figure(NAME, f"{storage}: recall@{K} vs exact search", m["recall"], "%", against, base["recall"],
                   targets["recall"]),
            Figure(NAME, f"{storage}: query latency (median)", m["latency"], "ms", against, base["latency"]),
        ]
    figures.append(Figure(NAME, "exact search: query latency (median)", exact_ms, "ms", against, base["latency"]))
    return figures
