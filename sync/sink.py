"""The write path: binary COPY into a staging table, then one upsert into the target table (a
few rows: one INSERT of their values).

Rows whose vector, model version and input hash are unchanged are not rewritten.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from vectorsync.errors import DatabaseError
from vectorsync.sync.catalog import Embedding

STAGE = sql.Identifier("vectorsync_stage")
CHANGED = sql.SQL(
    "t.model_version IS DISTINCT FROM EXCLUDED.model_version OR t.input_hash IS DISTINCT FROM EXCLUDED.input_hash "
    "OR t.embedding IS DISTINCT FROM EXCLUDED.embedding"
)
ONLY_OLDER = sql.SQL("t.model_version < EXCLUDED.model_version")
#: Up to this many rows are written with one INSERT (a lone change's path); more go through COPY.
SMALL_WRITE = 32


class _NumpyVectorDumper(Dumper):
    """Binary dumper for float32 rows of a matrix: pgvector's wire format (dims, unused, values as
    big-endian float4) straight from numpy, without building a ``pgvector.Vector`` per row, which
    is most of the cost of writing small vectors."""

    format = Format.BINARY

    def dump(self, obj: np.ndarray) -> bytes:
        return struct.pack(">HH", obj.shape[0], 0) + obj.astype(">f4", copy=False).tobytes()


#: Binary COPY framing (PostgreSQL's "COPY ... FORMAT BINARY" file layout).
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\0" + b"\0\0\0\0" + b"\0\0\0\0"
_COPY_TRAILER = b"\xff\xff"
_COPY_BLOCK_ROWS = 10_000
_NULL_FIELD = b"\xff\xff\xff\xff"


def _copy_records(
    keys: Sequence[str], vectors: np.ndarray, model_version: int, hashes: Sequence[str | None]
) -> bytes:
    """Binary COPY records ``(key text, embedding vector, model_version int4, input_hash text)``.

    The fixed-width middle of every record (the vector in pgvector's wire format and the model
    version) is laid out by numpy for all rows at once; only the variable-width text fields are
    joined per row. Writing row by row through the driver costs ~10 µs a row, most of the Python
    time of a large graph run's write phase.
    """
    n, dim = vectors.shape
    middle = np.empty(
        n,
        dtype=np.dtype([("vlen", ">i4"), ("dim", ">u2"), ("unused", ">u2"), ("values", ">f4", (dim,)),
                        ("mlen", ">i4"), ("version", ">i4")]),
    )
    middle["vlen"] = 4 + 4 * dim
    middle["dim"] = dim
    middle["unused"] = 0
    middle["values"] = vectors
    middle["mlen"] = 4
    middle["version"] = model_version
    blob = middle.tobytes()
    width = middle.dtype.itemsize
    parts: list[bytes] = []
    for i, (key, digest) in enumerate(zip(keys, hashes, strict=True)):
        encoded = key.encode()
        parts.append(struct.pack(">hi", 4, len(encoded)))
        parts.append(encoded)
        parts.append(blob[i * width : (i + 1) * width])
        if digest is None:
            parts.append(_NULL_FIELD)
        else:
            text = digest.encode()
            parts.append(struct.pack(">i", len(text)))
            parts.append(text)
    return b"".join(parts)


def _register_dumper(conn: psycopg.Connection) -> None:
    info = conn.adapters.types.get("vector")
    if info is None:  # connection opened before the extension existed
        register_vector(conn)
        info = conn.adapters.types.get("vector")
    if info is None:
        raise DatabaseError("the 'vector' type is not in this database; run `vectorsync migrate` first")
    dumper = conn.adapters.get_dumper_by_oid(info.oid, Format.BINARY)
    if not issubclass(dumper, _NumpyVectorDumper):
        conn.adapters.register_dumper(np.ndarray, type("VectorDumper", (_NumpyVectorDumper,), {"oid": info.oid}))


def _ensure_stage(conn: psycopg.Connection) -> None:
    _register_dumper(conn)
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} (key text, embedding vector, model_version integer, "
            "input_hash text) ON COMMIT DELETE ROWS"
        ).format(STAGE)
    )


def upsert(
    conn: psycopg.Connection,
    emb: Embedding,
    keys: Sequence[str],
    vectors: np.ndarray,
    model_version: int,
    input_hashes: Sequence[str | None] | None = None,
    *,
    only_older: bool = False,
) -> int:
    """Write ``vectors`` for ``keys`` (text form) inside the caller's transaction; returns rows written.

    ``only_older`` replaces a stored vector only if an older model version made it: the bulk
    backfill reads a snapshot, and a worker may meanwhile have written a vector from newer values.
    """
    if len(keys) == 0:
        return 0
    if vectors.shape != (len(keys), emb.spec.dim):
        raise ValueError(
            f"embedding {emb.name!r}: got vectors of shape {vectors.shape}, expected ({len(keys)}, {emb.spec.dim})"
        )
    hashes = input_hashes if input_hashes is not None else [None] * len(keys)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    condition = ONLY_OLDER if only_older else CHANGED
    if len(keys) <= SMALL_WRITE:
        return _upsert_values(conn, emb, keys, vectors, model_version, hashes, condition)
    _ensure_stage(conn)
    with conn.cursor() as cur:
        with cur.copy(
            sql.SQL("COPY {} (key, embedding, model_version, input_hash) FROM STDIN WITH (FORMAT BINARY)").format(STAGE)
        ) as copy:
            copy.write(_COPY_SIGNATURE)
            for start in range(0, len(keys), _COPY_BLOCK_ROWS):
                stop = start + _COPY_BLOCK_ROWS
                copy.write(_copy_records(keys[start:stop], vectors[start:stop], model_version, hashes[start:stop]))
            copy.write(_COPY_TRAILER)
        cur.execute(
            sql.SQL(
                """
                INSERT INTO {target} AS t ({key}, embedding, model_version, input_hash, embedded_at)
                SELECT CAST(s.key AS {ktype}), s.embedding, s.model_version, s.input_hash, now() FROM {stage} s
                ON CONFLICT ({key}) DO UPDATE SET embedding = EXCLUDED.embedding,
                    model_version = EXCLUDED.model_version, input_hash = EXCLUDED.input_hash,
                    embedded_at = EXCLUDED.embedded_at
                WHERE {condition}
                """
            ).format(
                target=emb.target,
                key=emb.key,
                ktype=emb.key_sql_type,
                stage=STAGE,
                condition=condition,
            )
        )
        written = cur.rowcount
        cur.execute(sql.SQL("TRUNCATE {}").format(STAGE))
    return written


def _upsert_values(
    conn: psycopg.Connection,
    emb: Embedding,
    keys: Sequence[str],
    vectors: np.ndarray,
    model_version: int,
    hashes: Sequence[str | None],
    condition: sql.SQL,
) -> int:
    """The upsert of a few rows as one statement: no staging table to create, fill and empty."""
    _register_dumper(conn)
    row = sql.SQL("(CAST(%s AS {ktype}), %b, CAST(%s AS integer), CAST(%s AS text), now())").format(
        ktype=emb.key_sql_type
    )
    cur = conn.execute(
        sql.SQL(
            """
            INSERT INTO {target} AS t ({key}, embedding, model_version, input_hash, embedded_at) VALUES {rows}
            ON CONFLICT ({key}) DO UPDATE SET embedding = EXCLUDED.embedding,
                model_version = EXCLUDED.model_version, input_hash = EXCLUDED.input_hash,
                embedded_at = EXCLUDED.embedded_at
            WHERE {condition}
            """
        ).format(target=emb.target, key=emb.key, rows=sql.SQL(", ").join([row] * len(keys)), condition=condition),
        [value for key, vector, digest in zip(keys, vectors, hashes, strict=True)
         for value in (key, vector, model_version, digest)],
    )
    return cur.rowcount


def delete_keys(conn: psycopg.Connection, emb: Embedding, keys: Sequence[str]) -> int:
    if not keys:
        return 0
    cur = conn.execute(
        sql.SQL("DELETE FROM {} WHERE {} = ANY(CAST(%s AS {}))").format(emb.target, emb.key, emb.key_array_type),
        (list(keys),),
    )
    return cur.rowcount


def delete_orphans(conn: psycopg.Connection, emb: Embedding) -> int:
    """Remove vectors whose source row is gone (e.g. deleted while triggers were disabled)."""
    cur = conn.execute(
        sql.SQL("DELETE FROM {tgt} t WHERE NOT EXISTS (SELECT 1 FROM {src} s WHERE s.{key} = t.{key})").format(
            tgt=emb.target, src=emb.source, key=emb.key
        )
    )
    return cur.rowcount
