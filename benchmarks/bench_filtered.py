"""Filtered search through the index: iterative index scans against the exact filtered search.

100k vectors (20k with --quick) of dimension 64 in gaussian clusters, loaded with the sink's binary
COPY, then the HNSW index at the spec's defaults. Three filters keep 50 %, 10 % and 1 % of the
rows. For each, the same query vectors go through ``vectorsync.nearest_to_where`` (exact when the
planner estimates the filter keeps few rows; else on pgvector >= 0.8 an iterative index scan,
re-sorted, exact only when it finds fewer than k rows) and through
the exact filtered search (every matching row compared, the fallback's statement), interleaved in
the same run. Recall@10 is measured against that exact search; latency is the median per query.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from benchmarks.common import Figure, scratch_database, timer
from vectorsync.sync import capabilities, catalog, schema, sink
from vectorsync.sync.bulk import create_index, drop_index
from vectorsync.sync.spec import parse_config

NAME = "filtered"
DIM = 64
K = 10
#: filter column -> share of the rows it keeps (the column is ``id % modulus``; the filter keeps 0)
FILTERS = {"b50": 2, "b10": 10, "b1": 100}


def vectors(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, DIM))).astype(np.float32)


def load(url: str, rows: int, data: np.ndarray) -> float:
    """Table, embedding, vectors and index; returns the index build seconds."""
    config = parse_config({"embeddings": [{"name": "docs", "table": "docs", "key": "id", "modality": "tabular",
                                           "dim": DIM, "columns": ["b50"]}]})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, b50 integer, b10 integer, b1 integer)")
        conn.execute("INSERT INTO docs SELECT g, g %% 2, g %% 10, g %% 100 FROM generate_series(0, %s) g",
                     (rows - 1,))
        schema.upgrade(url, config)
        conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
        emb = catalog.load(conn, config.embeddings[0])
        drop_index(conn, emb)
        with conn.transaction():
            for start in range(0, rows, 20_000):
                chunk = data[start:start + 20_000]
                sink.upsert(conn, emb, [str(i) for i in range(start, start + len(chunk))], chunk, 1)
        conn.execute("SET maintenance_work_mem = '1GB'")
        with timer() as build_time:
            create_index(conn, emb)
        conn.execute("ANALYZE docs, docs_embeddings")
        conn.execute("UPDATE vectorsync.embeddings SET current_version = 1")
    return build_time[0]


def run(data_dir: Path, quick: bool) -> list[Figure]:
    rows, queries = (20_000, 30) if quick else (100_000, 100)
    centers = np.random.default_rng(0).normal(size=(1000, DIM)) * 2
    data = vectors(rows, 1, centers)
    probes = vectors(queries, 2, centers)
    figures: list[Figure] = []
    with scratch_database(data_dir) as url:
        load(url, rows, data)
        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            iterative = capabilities.detect(conn).has("iterative index scans")
            for column, modulus in FILTERS.items():
                share = f"{100 // modulus} %"
                where = json.dumps({column: 0})
                exact_sql = conn.execute(
                    "SELECT vectorsync._search_sql(e, %s, exact => true) FROM vectorsync.embeddings e "
                    "WHERE name = 'docs'", (where,)).fetchone()
                assert exact_sql is not None
                # the statement's $n parameters as psycopg's named ones: query, left-out key, k, filter
                exact_query = re.sub(r"\$([1-4])", lambda m: f"%({'qxkf'[int(m[1]) - 1]})s", exact_sql[0])
                fast_times: list[float] = []
                exact_times: list[float] = []
                hits = 0
                for q in probes:
                    started = time.perf_counter()
                    got = conn.execute("SELECT key FROM vectorsync.nearest_to_where('docs', %s, %s, %s)",
                                       (q, K, where)).fetchall()
                    fast_times.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    truth = conn.execute(exact_query, {"q": q, "x": None, "k": K, "f": Jsonb({column: 0})}).fetchall()
                    exact_times.append(time.perf_counter() - started)
                    hits += len({k for (k,) in got} & {k for k, _ in truth})
                selective = conn.execute("SELECT vectorsync._selective(vectorsync._embedding('docs'), %s, %s)",
                                         (where, K)).fetchone()
                if selective is not None and selective[0]:
                    path = "selective filter, exact"
                else:
                    path = "iterative index scan" if iterative else "index scan, exact fallback"
                exact_ms = float(np.median(exact_times)) * 1000
                figures.append(Figure(NAME, f"filter keeping {share}: latency, {path}",
                                      float(np.median(fast_times)) * 1000, "ms", "exact filtered search", exact_ms))
                figures.append(Figure(NAME, f"filter keeping {share}: recall@{K}, {path}",
                                      100 * hits / (queries * K), "%", "exact filtered search", 100.0))
    return figures
