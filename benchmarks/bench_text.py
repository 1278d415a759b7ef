"""Text ``vectorsync sync`` throughput vs. the model's own encode rate on the same texts, in the same run.

For MiniLM (pretrained, 384-d) and the corpus-trained LSTM: the baseline is ``encoder.encode`` over
the same texts in batches of the same size, already in memory; the sync path
(``sync.service.sync``) also queues or streams the rows from Postgres and writes the vectors
with binary COPY. No vector index, so the ratio is the sync path's own cost (index builds are
measured by the tabular and query benchmarks). Target for MiniLM: sync ≥ 0.9 x encode.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import psycopg
from psycopg import sql

from benchmarks.common import Figure, scratch_database, timer

BATCH = 2048  # the ``vectorsync sync`` default


def corpus(count: int) -> list[str]:
    from tests.text_data import make_corpus

    texts, _ = make_corpus(count, seed=13)
    return texts


def text_spec(name: str, encoder: dict, dim: int) -> dict:
    return {
        "name": name,
        "table": "articles",
        "key": "id",
        "modality": "text",
        "dim": dim,
        "column": "body",
        "index": "none",
        "encoder": encoder,
    }


def encode_rate(encoder, texts: list[str]) -> float:
    frames = [pd.DataFrame({"body": texts[start : start + BATCH]}) for start in range(0, len(texts), BATCH)]
    with timer() as elapsed:
        for frame in frames:
            encoder.encode(frame)
    return len(texts) / elapsed[0]


def sync_rate(url: str, conn: psycopg.Connection, config, name: str, rows: int) -> float:
    from vectorsync.sync import catalog, service

    emb = catalog.load(conn, config.embedding(name))
    conn.execute(sql.SQL("TRUNCATE {}").format(emb.target))  # a repeat run starts from no vectors again
    with timer() as elapsed:
        result = service.sync(url, config, name, batch_size=BATCH)
    assert result.embedded == rows, result
    return rows / elapsed[0]


def measure(url: str, conn: psycopg.Connection, config, name: str, texts: list[str], label: str) -> Figure:
    """Encode / sync / encode / sync; each rate is the best of its two runs, so a burst of other load
    on the shared machine does not decide the ratio."""
    from vectorsync.sync import catalog, models

    emb = catalog.load(conn, config.embedding(name))
    with conn.transaction():
        version = models.ensure_model(conn, emb)
    encoder = models.ModelCache().get(conn, emb, version)
    encoder.encode(pd.DataFrame({"body": texts[:64]}))  # warm-up: loads weights, first-call allocations
    baseline = encode_rate(encoder, texts)
    rate = sync_rate(url, conn, config, name, len(texts))
    baseline = max(baseline, encode_rate(encoder, texts))
    rate = max(rate, sync_rate(url, conn, config, name, len(texts)))
    return Figure("text sync", f"texts/s, {len(texts):,} texts, {label}", rate, "texts/s",
                  "encoder.encode, same batches", baseline, "ratio ≥ 0.9")


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from vectorsync.sync import catalog, schema
    from vectorsync.sync import train as training
    from vectorsync.sync.spec import parse_config

    minilm_rows, lstm_rows = (1_000, 5_000) if quick else (5_000, 30_000)
    texts = corpus(max(minilm_rows, lstm_rows))
    config = parse_config(
        {"embeddings": [text_spec("minilm", {"type": "minilm"}, 384), text_spec("lstm", {"epochs": 1}, 64)]}
    )
    figures: list[Figure] = []
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE articles (id bigint PRIMARY KEY, body text NOT NULL)")
        with conn.cursor().copy("COPY articles (id, body) FROM STDIN") as copy:
            for i, text in enumerate(texts[:lstm_rows]):
                copy.write_row((i, text))
        schema.upgrade(url, config)
        training.train(url, conn, catalog.load(conn, config.embedding("lstm")), sample=3000)
        figures.append(measure(url, conn, config, "lstm", texts[:lstm_rows], "LSTM 64-d trained on the column"))
        conn.execute("DELETE FROM articles WHERE id >= %s", (minilm_rows,))
        figures.append(measure(url, conn, config, "minilm", texts[:minilm_rows], "MiniLM-L6 384-d, CPU"))
    return figures
