"""``vectorsync train``: fit an encoder on the table's own rows and register a new model version."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.base import Progress
from vectorsync.errors import InputError
from vectorsync.sync import generations, sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.db import scalar, session_options
from vectorsync.sync.models import new_encoder, store
from vectorsync.sync.spec import ImageSpec

#: Rows per streamed training chunk for images and faces (others stream 2,048 rows a chunk).
IMAGE_CHUNK_ROWS = 256


def count_rows(conn: psycopg.Connection, emb: Embedding) -> int:
    return scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(emb.source))


def train(
    url: str,
    conn: psycopg.Connection,
    emb: Embedding,
    *,
    progress: Progress | None = None,
    sample: int | None = None,
) -> tuple[int, dict[str, float], int]:
    """Train on up to ``sample`` rows (the spec's ``train_sample`` by default), store the model as a
    new version, and start the generation that embeds it (sync.generations): queries keep reading
    the generation in service until the new one is complete, indexed and swapped in.

    Returns (version, metrics, rows used). Training data is streamed through server-side cursors on
    a separate connection, chunk by chunk, once per epoch.
    """
    spec = emb.spec
    if spec.encoder_type == "graphsage":
        from vectorsync.sync.graph_sage import train_graphsage

        return train_graphsage(conn, emb, progress=progress)
    encoder = new_encoder(spec)
    rows = count_rows(conn, emb)
    if rows == 0:
        raise InputError(None, f"embedding {spec.name!r}: table {spec.table!r} has no rows to train on")
    limit = min(sample or spec.train_sample, rows)
    holdout_rows = max(1, limit // 10) if rows >= 20 else 0
    # Without sampling, the key-hash split alone decides (~10 % held out), so every row is used once;
    # capping each part at a count would leave out rows the hash put on the larger side.
    train_cap, holdout_cap = (None, None) if limit == rows else (limit - holdout_rows, holdout_rows)
    extra = [c for c in [getattr(spec, "label_column", None)] if c]
    seed = spec.encoder.seed if spec.encoder else 0

    # Encoded images can be megabytes each: fetch fewer per chunk so a chunk stays small in memory.
    chunk_rows = IMAGE_CHUNK_ROWS if isinstance(spec, ImageSpec) else 2048

    def batches(holdout: bool, cap: int | None) -> Iterator[pd.DataFrame]:
        with psycopg.connect(url, options=session_options(url)) as reader:
            yield from sources.stream_rows(
                reader, emb, extra_columns=extra, holdout=holdout, sample=cap, seed=seed, chunk_rows=chunk_rows
            )

    def resolved(holdout: bool, cap: int | None) -> Iterator[pd.DataFrame]:
        for chunk in batches(holdout, cap):
            failures = sources.resolve_references(emb, chunk)
            if failures:
                chunk = chunk.drop(index=chunk.index[list(failures)]).reset_index(drop=True)
            if len(chunk):
                yield chunk

    if holdout_rows:
        metrics = encoder.fit(
            lambda: resolved(False, train_cap),
            lambda: resolved(True, holdout_cap),
            seed=seed,
            progress=progress,
        )
    else:
        metrics = encoder.fit(lambda: resolved(False, limit), None, seed=seed, progress=progress)
    with conn.transaction():
        version = store(conn, emb, encoder, {k: float(v) for k, v in metrics.items()}, limit)
        generations.start(conn, emb, version)
    return version, metrics, limit
