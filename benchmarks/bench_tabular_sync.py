"""Tabular ``vectorsync sync`` throughput vs. the raw bound measured in the same run.

The raw bound reads the same columns of the same rows and writes precomputed vectors of the same
dimension with binary COPY into an unindexed table: the least work any loader must do. vectorsync
does that plus queueing, preprocessing, encoding, the upsert, and the index build after the
backfill (reported separately). Target: sync ≥ 0.5 x raw.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from benchmarks.common import Figure, scratch_database, timer

DIM = 16
NUMERIC = [f"x{i}" for i in range(8)]
CATEGORICAL = ["colour", "size"]


def generate(conn: psycopg.Connection, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    columns = sql.SQL(", ").join(sql.SQL("{} double precision").format(sql.Identifier(c)) for c in NUMERIC)
    conn.execute(sql.SQL("CREATE TABLE items (id bigint PRIMARY KEY, {}, colour text, size text)").format(columns))
    centres = rng.normal(size=(12, len(NUMERIC))) * 3
    cluster = rng.integers(0, 12, size=rows)
    values = centres[cluster] + rng.normal(size=(rows, len(NUMERIC)))
    colours = np.array(["red", "green", "blue", "black", "white"])[cluster % 5]
    sizes = np.array(["S", "M", "L"])[cluster % 3]
    names = sql.SQL(", ").join(map(sql.Identifier, ["id", *NUMERIC, *CATEGORICAL]))
    with conn.cursor().copy(sql.SQL("COPY items ({}) FROM STDIN").format(names)) as copy:
        for i in range(rows):
            copy.write_row([i, *values[i].tolist(), colours[i], sizes[i]])
    conn.execute("ANALYZE items")


def raw_bound(url: str, rows: int) -> float:
    """Seconds to read the input columns and COPY precomputed vectors into a fresh table
    (one connection streams the reads, another writes, as a hand-written loader would)."""
    vectors = np.random.default_rng(1).normal(size=(rows, DIM)).astype(np.float32)
    names = sql.SQL(", ").join(map(sql.Identifier, ["id", *NUMERIC, *CATEGORICAL]))
    with psycopg.connect(url) as reader, psycopg.connect(url) as writer:
        register_vector(writer)
        writer.execute(
            sql.SQL("CREATE TABLE raw_vectors (id bigint PRIMARY KEY, embedding vector({}))").format(sql.Literal(DIM))
        )
        writer.commit()
        with timer() as elapsed:
            with reader.cursor(name="raw_read") as read, writer.cursor() as write:
                read.itersize = 10_000
                read.execute(sql.SQL("SELECT {} FROM items").format(names))
                with write.copy("COPY raw_vectors (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["int8", "vector"])
                    for i, row in enumerate(read):
                        copy.write_row((row[0], vectors[i]))
            writer.commit()
    return elapsed[0]


def hand_tuned_bound(url: str, target: sql.Composable) -> float:
    """Seconds to binary-COPY the vectors vectorsync produced into a fresh table and build the same
    HNSW index as a DBA would by hand: maintenance_work_mem large enough for the graph, a parallel
    worker per core beside the leader, then ANALYZE."""
    with psycopg.connect(url) as conn:
        register_vector(conn)
        keys, vectors = [], []
        with conn.cursor(binary=True) as cur:
            cur.execute(sql.SQL("SELECT id, embedding FROM {}").format(target))
            for key, vector in cur:
                keys.append(key)
                vectors.append(vector)
        conn.execute(sql.SQL("CREATE TABLE tuned_vectors (id bigint PRIMARY KEY, embedding vector({}))").format(
            sql.Literal(DIM)))
        conn.commit()
        workers = max(1, (os.cpu_count() or 2) - 1)
        with timer() as elapsed:
            with conn.cursor().copy("COPY tuned_vectors (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "vector"])
                for key, vector in zip(keys, vectors, strict=True):
                    copy.write_row((key, vector))
            conn.execute("SET maintenance_work_mem = '2GB'")
            conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(workers)))
            conn.execute("CREATE INDEX ON tuned_vectors USING hnsw (embedding vector_cosine_ops) "
                         "WITH (m = 16, ef_construction = 64)")
            conn.execute("ANALYZE tuned_vectors")
            conn.commit()
    return elapsed[0]


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from vectorsync.sync import service
    from vectorsync.sync.spec import parse_config

    rows = 20_000 if quick else 200_000
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        generate(conn, rows)
        config = parse_config(
            {
                "embeddings": [
                    {
                        "name": "items",
                        "table": "items",
                        "key": "id",
                        "modality": "tabular",
                        "dim": DIM,
                        "columns": NUMERIC + CATEGORICAL,
                        "encoder": {"epochs": 3},
                    }
                ]
            }
        )
        service.migrate(url, config)
        service.train(url, config, "items", sample=20_000)
        raw_seconds = raw_bound(url, rows)
        with timer() as elapsed:
            result = service.sync(url, config, "items", batch_size=10_000)
        assert result.embedded == rows, result
        sync_seconds = elapsed[0]
        index_seconds = result.index_seconds
        tuned_seconds = hand_tuned_bound(url, sql.Identifier("items_embeddings"))
    sync_rate = rows / (sync_seconds - index_seconds)
    return [
        Figure("tabular sync", f"rows/s, {rows:,} rows, dim {DIM} (index build excluded)", sync_rate, "rows/s",
               "raw read + binary COPY", rows / raw_seconds, "ratio ≥ 0.5"),
        Figure("tabular sync", "rows/s including the HNSW build after the backfill", rows / sync_seconds, "rows/s",
               "raw read + binary COPY", rows / raw_seconds),
        Figure("tabular sync", f"sync incl. index build, {rows:,} rows", rows / sync_seconds, "rows/s",
               "the same vectors: binary COPY + hand-tuned CREATE INDEX + ANALYZE", rows / tuned_seconds,
               "ratio ≥ 0.9"),
    ]
