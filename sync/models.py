"""The model registry: encoder weights, parameters and metrics, versioned, stored in Postgres.

Every worker on every machine loads the same bytes, so every vector of one version is comparable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg

from vectorsync.encoders.base import Encoder, load_encoder
from vectorsync.encoders.registry import encoder_class
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.spec import EmbeddingSpec


class NoModel(RuntimeError):
    """The embedding needs a trained model and has none."""


def encoder_params(spec: EmbeddingSpec) -> dict[str, Any]:
    """The encoder's parameters: the spec's ``encoder`` table plus the modality's own fields."""
    params: dict[str, Any] = dict(spec.encoder.params)  # the seed goes to fit(), not here
    for field in ("image_size", "channels", "detect_faces", "label_column", "encoding", "max_tokens", "long_text"):
        if hasattr(spec, field):
            params[field] = getattr(spec, field)
    return params


_torch_configured = False


def configure_torch() -> None:
    """Use ``VECTORSYNC_TORCH_THREADS`` threads (default 1) for the encoders of this process.

    Batches are small and a worker process runs beside PostgreSQL: more intra-op threads mostly
    contend for the same cores (measured ~10x slower tabular training with 2 threads on 2 busy
    cores). Scale out with more worker processes instead.
    """
    global _torch_configured
    if not _torch_configured:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("VECTORSYNC_TORCH_THREADS", "1"))))
        _torch_configured = True


def new_encoder(spec: EmbeddingSpec) -> Encoder:
    configure_torch()
    return encoder_class(spec.encoder_type)(spec.dim, spec.input_columns, encoder_params(spec))


def register_version(
    conn: psycopg.Connection,
    emb: Embedding,
    *,
    encoder_type: str,
    weights: bytes,
    params: dict[str, Any],
    metrics: dict[str, float] | None = None,
    trained_rows: int | None = None,
) -> int:
    """Add the next model version of ``emb`` and make it current; returns its number."""
    lock_registry(conn, emb)
    version = conn.execute(
        "SELECT coalesce(max(version), 0) + 1 FROM vectorsync.models WHERE embedding = %s", (emb.name,)
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO vectorsync.models (embedding, version, encoder_type, dim, weights, metrics, params, trained_rows) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            emb.name,
            version,
            encoder_type,
            emb.spec.dim,
            weights,
            json.dumps(metrics or {}),
            json.dumps(params, sort_keys=True, default=str),
            trained_rows,
        ),
    )
    make_current(conn, emb, version)
    return version


def lock_registry(conn: psycopg.Connection, emb: Embedding) -> None:
    """Serialise version numbering of one embedding until the transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('vectorsync.models:' || %s, 0))", (emb.name,))


def make_current(conn: psycopg.Connection, emb: Embedding, version: int) -> None:
    conn.execute(
        "UPDATE vectorsync.embeddings SET current_version = %s WHERE name = %s AND current_version IS DISTINCT FROM %s",
        (version, emb.name, version),
    )


def store(
    conn: psycopg.Connection,
    emb: Embedding,
    encoder: Encoder,
    metrics: dict[str, float],
    trained_rows: int | None,
) -> int:
    """Save a trained (or pretrained) encoder as a new model version and make it current."""
    return register_version(
        conn,
        emb,
        encoder_type=encoder.type,
        weights=encoder.to_bytes(),
        params=encoder.params,
        metrics=metrics,
        trained_rows=trained_rows,
    )


def current_version(conn: psycopg.Connection, name: str) -> int | None:
    row = conn.execute("SELECT current_version FROM vectorsync.embeddings WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


class ModelCache:
    """Loads each (embedding, version) once per process."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], Encoder] = {}

    def get(self, conn: psycopg.Connection, emb: Embedding, version: int) -> Encoder:
        key = (emb.name, version)
        if key not in self._models:
            row = conn.execute(
                "SELECT weights FROM vectorsync.models WHERE embedding = %s AND version = %s", key
            ).fetchone()
            if row is None:
                raise NoModel(f"embedding {emb.name!r} has no model version {version}")
            configure_torch()
            self._models[key] = load_encoder(bytes(row[0]))
        return self._models[key]


def ensure_model(conn: psycopg.Connection, emb: Embedding) -> int:
    """The current version; pretrained encoders get version 1 registered on first use."""
    version = current_version(conn, emb.name)
    if version is not None:
        return version
    encoder = new_encoder(emb.spec)
    if encoder.trainable:
        raise NoModel(f"embedding {emb.name!r} has no trained model yet; run `vectorsync train {emb.name}`")
    return store(conn, emb, encoder, {}, None)
