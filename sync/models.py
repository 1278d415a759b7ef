"""The model registry: encoder weights, parameters and metrics, versioned, stored in Postgres.

Every worker on every machine loads the same bytes, so every vector of one version is comparable.
The bytes are a safetensors file (see ``encoders.base``) whose SHA-256 is recorded with the version
and checked before loading; nothing stored here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

import psycopg

from vectorsync.encoders.base import DeviceError, Encoder, ModelFormatError, load_encoder, resolve_device, thread_count
from vectorsync.encoders.params import EncoderParams
from vectorsync.encoders.registry import encoder_class
from vectorsync.errors import ModelError
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.spec import EmbeddingSpec, SpecError

log = logging.getLogger(__name__)


class NoModel(ModelError):
    """The embedding needs a trained model and has none."""


class UnusableModel(NoModel):
    """A stored model version cannot be loaded safely (old pickle format, damaged or crafted row)."""


class ModelInputsGone(NoModel):
    """The model in service reads a source column the spec no longer lists: it needs retraining."""


def encoder_params(spec: EmbeddingSpec) -> EncoderParams:
    """The encoder's validated parameters: the spec's ``encoder`` table plus the embedding's own
    fields the encoder reads (``image_size``, ``max_tokens``...)."""
    if spec.encoder is None:
        raise SpecError(f"embedding {spec.name!r} is a {spec.modality} embedding, which has no encoder")
    fields = {name: getattr(spec, name) for name in spec.encoder.FROM_EMBEDDING if hasattr(spec, name)}
    return spec.encoder.model_copy(update=fields)


_thread_share = 1
_torch_threads: int | None = None


def share_threads(workers: int) -> None:
    """Divide this process's cores among ``workers`` encoding threads (``worker -n``)."""
    global _thread_share, _torch_threads
    _thread_share, _torch_threads = max(1, workers), None


def configure_torch() -> int:
    """Give torch the cores this process may use (CPU affinity and cgroup quota respected), divided
    among its worker threads, or ``VECTORSYNC_TORCH_THREADS``; return the count.

    A worker or a ``sync`` that left cores idle ran the pretrained text model at half its speed;
    tiny models (the tabular autoencoder) still run on one thread of their own accord.
    """
    global _torch_threads
    if _torch_threads is None:
        import torch

        _torch_threads = encoder_threads()
        torch.set_num_threads(_torch_threads)
    return _torch_threads


def encoder_threads() -> int:
    """This process's share of the cores for one encoding thread (what ``configure_torch`` gives
    torch), found without importing torch."""
    return thread_count(_thread_share)


def check_device(spec: EmbeddingSpec) -> None:
    """Refuse, naming the embedding, a ``device`` that is not on this machine (``cuda`` without a
    GPU), before any model is built or loaded."""
    device = getattr(encoder_params(spec), "device", None)
    # dlib does not run on torch; auto and cpu always resolve, so torch (seconds to import) can
    # load later, in the background.
    if device is None or device in ("auto", "cpu"):
        return
    try:
        resolve_device(device)
    except DeviceError as exc:
        raise DeviceError(f"embedding {spec.name!r}: {exc}") from None


def new_encoder(spec: EmbeddingSpec) -> Encoder:
    check_device(spec)
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
    history: list[dict[str, float]] | None = None,
    columns: list[str] | None = None,
) -> int:
    """Add the next model version of ``emb`` and make it current; returns its number. ``history``
    is the training curve, one ``{"epoch": n, "loss": x}`` per epoch; ``columns`` the model's input
    columns, recorded by attribute number so that a rename of one does not strand the model."""
    lock_registry(conn, emb)
    row = conn.execute(
        "SELECT coalesce(max(version), 0) + 1 FROM vectorsync.models WHERE embedding = %s", (emb.name,)
    ).fetchone()
    assert row is not None  # an aggregate always returns one row
    version = int(row[0])
    conn.execute(
        "INSERT INTO vectorsync.models (embedding, version, encoder_type, dim, weights, sha256, metrics, params, "
        "trained_rows, history, input_attnums) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            emb.name,
            version,
            encoder_type,
            emb.spec.dim,
            weights,
            hashlib.sha256(weights).hexdigest(),
            json.dumps(_finite(metrics or {})),
            json.dumps(params, sort_keys=True, default=str),
            trained_rows,
            json.dumps(_finite(history or [])),
            _attnums(conn, emb, columns) if columns else None,
        ),
    )
    make_current(conn, emb, version)
    return version


def _attnums(conn: psycopg.Connection, emb: Embedding, columns: list[str]) -> list[int | None]:
    """The attribute numbers of ``columns`` in ``emb``'s source table (None for a missing one)."""
    row = conn.execute(
        "SELECT ARRAY(SELECT a.attnum FROM unnest(%s::text[]) WITH ORDINALITY AS c (name, pos) "
        "LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(%s) AND a.attname = c.name "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY c.pos)",
        (columns, emb.source.as_string(conn)),
    ).fetchone()
    assert row is not None  # an ARRAY() expression always returns one row
    return list(row[0])


def input_renames(conn: psycopg.Connection, emb: Embedding, version: int, encoder: Encoder) -> dict[str, str]:
    """Spec column -> the name model ``version`` knows it by, for input columns renamed since it
    was trained (matched by attribute number); empty when every name still matches.

    Raises ``ModelInputsGone`` when the model reads a column the spec no longer lists (dropped
    from the table or from the spec): every row would fail alike, so the embedding waits for
    ``vectorsync train`` instead.
    """
    row = conn.execute(
        "SELECT input_attnums FROM vectorsync.models WHERE embedding = %s AND version = %s", (emb.name, version)
    ).fetchone()
    recorded = row[0] if row else None
    if not recorded or None in recorded or len(recorded) != len(encoder.columns):  # older versions: by name
        return {}
    current = dict(zip(_attnums(conn, emb, emb.spec.input_columns), emb.spec.input_columns, strict=True))
    renames: dict[str, str] = {}
    for known_as, attnum in zip(encoder.columns, recorded, strict=True):
        name = current.get(attnum)
        if name is None:
            if known_as in emb.spec.input_columns:  # re-created under its old name: read it by name
                continue
            raise ModelInputsGone(
                f"model version {version} of embedding {emb.name!r} was trained on column {known_as!r}, which "
                f"the spec no longer reads; run `vectorsync train {emb.name}`"
            )
        if name != known_as:
            renames[name] = known_as
    return renames


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float made None: JSON has no such numbers, and a metric
    over an empty holdout (a tiny table) is NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


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
        history=encoder.history,
        columns=encoder.columns,
    )


def current_version(conn: psycopg.Connection, name: str) -> int | None:
    row = conn.execute("SELECT current_version FROM vectorsync.embeddings WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


class ModelCache:
    """Loads each stored model once per process.

    Models are cached by their checksum as well as their version, so a model recreated under the
    same version number (``migrate --recreate``, then ``train``) is loaded afresh, not served stale.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, int, str], Encoder] = {}

    def get(self, conn: psycopg.Connection, emb: Embedding, version: int) -> Encoder:
        row = conn.execute(
            "SELECT sha256 FROM vectorsync.models WHERE embedding = %s AND version = %s", (emb.name, version)
        ).fetchone()
        if row is None:
            raise NoModel(f"embedding {emb.name!r} has no model version {version}")
        key = (emb.name, version, row[0] or "")
        if key not in self._models:
            self._models = {k: v for k, v in self._models.items() if k[0] != emb.name}  # one model per embedding
            self._models[key] = load_model(conn, emb, version)
        return self._models[key]


def load_model(conn: psycopg.Connection, emb: Embedding, version: int) -> Encoder:
    """Model ``version`` of ``emb``, checked against its recorded SHA-256 and loaded as data only.

    A version stored before checksums (a pickle) or a row whose bytes do not match is refused with
    ``UnusableModel``, telling the user to retrain; it is never unpickled.
    """
    row = conn.execute(
        "SELECT weights, sha256 FROM vectorsync.models WHERE embedding = %s AND version = %s", (emb.name, version)
    ).fetchone()
    if row is None:
        raise NoModel(f"embedding {emb.name!r} has no model version {version}")
    blob, recorded = bytes(row[0]), row[1]
    where = f"model version {version} of embedding {emb.name!r}"
    retrain = f"run `vectorsync train {emb.name}` to store a new one"
    if recorded is None:
        raise UnusableModel(f"{where} has no recorded checksum (stored by an older, unsafe vectorsync); {retrain}")
    if hashlib.sha256(blob).hexdigest() != recorded:
        raise UnusableModel(f"{where} does not match its recorded SHA-256 (the row was altered); {retrain}")
    check_device(emb.spec)
    try:
        encoder = load_encoder(blob, runtime=encoder_params(emb.spec).model_dump(exclude_unset=True))
    except ModelFormatError as exc:
        raise UnusableModel(f"{where} was refused: {exc}; {retrain}") from None
    # A pretrained text model takes seconds to import and load: it loads while the caller claims
    # and reads its first batch, and reports its errors from the first encode.
    encoder.start_loading(encoder_threads(), configure_torch)
    return encoder


def ensure_model(conn: psycopg.Connection, emb: Embedding) -> int:
    """The current version; pretrained encoders get version 1 registered on first use."""
    version = current_version(conn, emb.name)
    if version is not None:
        return version
    encoder = new_encoder(emb.spec)
    if encoder.trainable:
        raise NoModel(f"embedding {emb.name!r} has no trained model yet; run `vectorsync train {emb.name}`")
    return store(conn, emb, encoder, {}, None)
