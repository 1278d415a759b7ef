"""Hybrid search latency: ``vectorsync.hybrid`` (keywords + vectors, fused) against the vector search
alone (``vectorsync.nearest_to``) on the same rows and query vectors, interleaved in one run.

100k rows (20k with --quick) of a text embedding with ``text_search``: generated sentences of 12
words from a 5,000-word vocabulary (a Zipf-like draw) plus a part number each, and 64-dimensional
clustered vectors, written by the sink (binary COPY, ``tsvector`` in the same statement), then the
HNSW index. Queries: half two common words (thousands of matching rows, each ranked by
``ts_rank_cd``), half a part number (one row). Latency is the median per query; the ratio is
hybrid over vector-only. The query vector is given, so encoding is not timed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from benchmarks.common import Figure, scratch_database, timer
from vectorsync.sync import catalog, schema, sink
from vectorsync.sync.bulk import create_index, drop_index
from vectorsync.sync.spec import parse_config

NAME = "hybrid"
DIM = 64
K = 10
CHUNK = 20_000


def corpus(rows: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Texts, and each row's part number."""
    vocabulary = np.array([f"w{i}" for i in range(5000)])
    weights = 1 / np.arange(1, 5001)
    words = rng.choice(vocabulary, size=(rows, 12), p=weights / weights.sum())
    codes = [f"PN-{i:06d}" for i in rng.permutation(rows)]
    return [" ".join(line) + f" part {code}" for line, code in zip(words, codes, strict=True)], codes


def load(url: str, texts: list[str], data: np.ndarray) -> float:
    """Table, embedding, vectors with keywords, and index; returns the load seconds."""
    spec = {"name": "docs", "table": "docs", "key": "id", "modality": "text", "dim": DIM, "column": "body",
            "text_search": {"language": "simple"}}
    config = parse_config({"embeddings": [spec]})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, body text)")
        with conn.cursor().copy("COPY docs (id, body) FROM STDIN") as copy:
            for i, text in enumerate(texts):
                copy.write_row((i, text))
        schema.upgrade(url, config)
        conn.execute("DELETE FROM vectorsync.queue")
        emb = catalog.load(conn, config.embeddings[0])
        drop_index(conn, emb)
        with timer() as load_time, conn.transaction():
            for start in range(0, len(texts), CHUNK):
                stop = min(start + CHUNK, len(texts))
                sink.upsert(conn, emb, [str(i) for i in range(start, stop)], data[start:stop], 1,
                            texts=texts[start:stop])
        create_index(conn, emb)
        conn.execute("ANALYZE docs")
        conn.execute("UPDATE vectorsync.embeddings SET current_version = 1")
    return load_time[0]


def run(data_dir: Path, quick: bool) -> list[Figure]:
    rows, queries = (20_000, 40) if quick else (100_000, 100)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(500, DIM)) * 2
    data = (centers[rng.integers(0, len(centers), rows)] + rng.normal(size=(rows, DIM))).astype(np.float32)
    texts, codes = corpus(rows, rng)
    probes = [(f"w{rng.integers(0, 50)} w{rng.integers(0, 200)}" if i % 2 else codes[rng.integers(0, rows)],
               data[rng.integers(0, rows)] + rng.normal(size=DIM).astype(np.float32)) for i in range(queries)]
    with scratch_database(data_dir) as url:
        load(url, texts, data)
        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            times: dict[str, tuple[list[float], list[float]]] = {
                "two common words": ([], []), "a part number": ([], [])
            }
            for i, (text, vector) in enumerate(probes):
                fused, alone = times["two common words" if i % 2 else "a part number"]
                started = time.perf_counter()
                conn.execute("SELECT key FROM vectorsync.hybrid('docs', %s, %s, %s)", (text, vector, K)).fetchall()
                fused.append(time.perf_counter() - started)
                started = time.perf_counter()
                conn.execute("SELECT key FROM vectorsync.nearest_to('docs', %s, %s)", (vector, K)).fetchall()
                alone.append(time.perf_counter() - started)
    return [
        Figure(NAME, f"latency per query, k={K}, {rows:,} rows, query text {kind}: hybrid (60 candidates a side)",
               float(np.median(fused)) * 1000, "ms", "vector search alone", float(np.median(alone)) * 1000)
        for kind, (fused, alone) in times.items()
    ]
