"""The write path: binary COPY into a staging table, then one upsert into the target table (a
few rows: one INSERT of their values).

Rows whose vector, model version, input hash (and keywords) are unchanged are not rewritten. A text
embedding with ``text_search`` gets the ``tsvector`` of each row's text in the same statement, in
the language its generation records.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from vectorsync.errors import DatabaseError
from vectorsync.migrations.operations import SEARCH_COLUMN
from vectorsync.sync import queue
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.db import scalar
from vectorsync.sync.sources import SEARCH_TEXT_CHARS
from vectorsync.sync.spec import TextSpec

STAGE = sql.Identifier("vectorsync_stage")
CHANGED = sql.SQL(
    "t.model_version IS DISTINCT FROM EXCLUDED.model_version OR t.input_hash IS DISTINCT FROM EXCLUDED.input_hash "
    "OR t.embedding IS DISTINCT FROM EXCLUDED.embedding"
)
ONLY_OLDER = sql.SQL("t.model_version < EXCLUDED.model_version")
#: Up to this many rows are written with one INSERT (a lone change's path); more go through COPY.
SMALL_WRITE = 32
SEARCH = sql.Identifier(SEARCH_COLUMN)


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


def _text_field(value: str | None) -> list[bytes]:
    if value is None:
        return [_NULL_FIELD]
    encoded = value.encode()
    return [struct.pack(">i", len(encoded)), encoded]


def _copy_records(
    keys: Sequence[str],
    vectors: np.ndarray,
    model_version: int,
    hashes: Sequence[str | None],
    bodies: Sequence[str] | None = None,
) -> bytes:
    """Binary COPY records ``(key text, embedding vector, model_version int4, input_hash text)``,
    and ``body text`` when ``bodies`` are given.

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
    fields = 4 if bodies is None else 5
    parts: list[bytes] = []
    for i, (key, digest) in enumerate(zip(keys, hashes, strict=True)):
        encoded = key.encode()
        parts.append(struct.pack(">hi", fields, len(encoded)))
        parts.append(encoded)
        parts.append(blob[i * width : (i + 1) * width])
        parts.extend(_text_field(digest))
        if bodies is not None:
            parts.extend(_text_field(bodies[i]))
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
            "input_hash text, body text) ON COMMIT DELETE ROWS"
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
    texts: Sequence[str] | None = None,
    only_older: bool = False,
) -> int:
    """Write ``vectors`` for ``keys`` (text form) inside the caller's transaction; returns rows written.

    ``texts`` are the rows' source texts, for an embedding with keyword search (``text_search``).
    ``only_older`` replaces a stored vector only if an older model version made it: the bulk
    backfill reads a snapshot, and a worker may meanwhile have written a vector from newer values.
    """
    if len(keys) == 0:
        return 0
    if len(keys) <= SMALL_WRITE:
        query, params = small_upsert(conn, emb, keys, vectors, model_version, input_hashes, texts=texts,
                                     only_older=only_older)
        return conn.execute(query, params).rowcount
    vectors, hashes, bodies = _checked(emb, keys, vectors, input_hashes, texts)
    keywords = _Keywords(emb, only_older)
    _ensure_stage(conn)
    with conn.cursor() as cur:
        body = sql.SQL(", body") if bodies is not None else sql.SQL("")
        with cur.copy(
            sql.SQL("COPY {} (key, embedding, model_version, input_hash{}) FROM STDIN WITH (FORMAT BINARY)").format(
                STAGE, body
            )
        ) as copy:
            copy.write(_COPY_SIGNATURE)
            for start in range(0, len(keys), _COPY_BLOCK_ROWS):
                stop = start + _COPY_BLOCK_ROWS
                copy.write(_copy_records(
                    keys[start:stop], vectors[start:stop], model_version, hashes[start:stop],
                    bodies[start:stop] if bodies is not None else None,
                ))
            copy.write(_COPY_TRAILER)
        cur.execute(
            sql.SQL(
                """
                INSERT INTO {target} AS t ({key}, embedding, model_version, input_hash, embedded_at{columns})
                SELECT CAST(s.key AS {ktype}), s.embedding, s.model_version, s.input_hash, now(){values}
                FROM {stage} s
                {on_conflict}
                """
            ).format(
                target=emb.target,
                key=emb.key,
                ktype=emb.key_sql_type,
                stage=STAGE,
                columns=keywords.column,
                values=keywords.value(sql.SQL("s.body")),
                on_conflict=_on_conflict(emb, keywords),
            )
        )
        written = cur.rowcount
        cur.execute(sql.SQL("TRUNCATE {}").format(STAGE))
    return written


def _checked(
    emb: Embedding,
    keys: Sequence[str],
    vectors: np.ndarray,
    input_hashes: Sequence[str | None] | None,
    texts: Sequence[str] | None,
) -> tuple[np.ndarray, Sequence[str | None], Sequence[str] | None]:
    """An upsert's vectors as contiguous float32, its hashes and its keyword texts (None without
    keyword search), after checking that they fit ``emb``."""
    if vectors.shape != (len(keys), emb.spec.dim):
        raise ValueError(
            f"embedding {emb.name!r}: got vectors of shape {vectors.shape}, expected ({len(keys)}, {emb.spec.dim})"
        )
    if emb.text_search is not None and texts is None:
        raise ValueError(f"embedding {emb.name!r} keeps keyword search: pass the rows' texts")
    hashes = input_hashes if input_hashes is not None else [None] * len(keys)
    return np.ascontiguousarray(vectors, dtype=np.float32), hashes, texts if emb.text_search is not None else None


def small_upsert(
    conn: psycopg.Connection,
    emb: Embedding,
    keys: Sequence[str],
    vectors: np.ndarray,
    model_version: int,
    input_hashes: Sequence[str | None] | None = None,
    *,
    texts: Sequence[str] | None = None,
    only_older: bool = False,
    when: sql.Composable | None = None,
) -> tuple[sql.Composed, list[Any]]:
    """``upsert`` of a few rows (up to ``SMALL_WRITE``) as one INSERT statement and its positional
    parameters, for ``conn``: no staging table to create, fill and empty. A caller may run it as
    part of a larger statement (the worker ends a lone change's batch with one), which ``when``, a
    condition, can make write nothing."""
    vectors, hashes, bodies = _checked(emb, keys, vectors, input_hashes, texts)
    keywords = _Keywords(emb, only_older)
    _register_dumper(conn)
    row = sql.SQL("(CAST(%s AS {ktype}), %b, CAST(%s AS integer), CAST(%s AS text), now(){keywords})").format(
        ktype=emb.key_sql_type, keywords=keywords.value(sql.SQL("CAST(%s AS text)"))
    )
    texts_or_none: Sequence[str | None] = bodies if bodies is not None else [None] * len(keys)
    query = sql.SQL(
        """
        INSERT INTO {target} AS t ({key}, embedding, model_version, input_hash, embedded_at{columns}) {rows}
        {on_conflict}
        """
    ).format(
        target=emb.target,
        key=emb.key,
        columns=keywords.column,
        rows=_values(sql.SQL(", ").join([row] * len(keys)), when),
        on_conflict=_on_conflict(emb, keywords),
    )
    params = [
        value
        for key, vector, digest, body in zip(keys, vectors, hashes, texts_or_none, strict=True)
        for value in (key, vector, model_version, digest, *([body] if bodies is not None else []))
    ]
    return query, params


def _values(rows: sql.Composable, when: sql.Composable | None) -> sql.Composed:
    if when is None:
        return sql.SQL("VALUES {}").format(rows)
    return sql.SQL("SELECT * FROM (VALUES {}) AS v WHERE {}").format(rows, when)


def _on_conflict(emb: Embedding, keywords: _Keywords) -> sql.Composable:
    """What both upserts do with a key that already has a vector: replace it when ``keywords``'
    condition holds (the vector changed, or, for the backfill, an older model made it)."""
    return sql.SQL(
        """ON CONFLICT ({key}) DO UPDATE SET embedding = EXCLUDED.embedding,
            model_version = EXCLUDED.model_version, input_hash = EXCLUDED.input_hash,
            embedded_at = EXCLUDED.embedded_at{updates}
        WHERE {condition}"""
    ).format(key=emb.key, updates=keywords.update, condition=keywords.condition)


class _Keywords:
    """The parts of an upsert that write the keyword column of an embedding with ``text_search``
    (all empty for one without): the ``tsvector`` of each row's text, in the language the
    generation records, read once per statement (an InitPlan)."""

    def __init__(self, emb: Embedding, only_older: bool) -> None:
        self.condition: sql.Composable = ONLY_OLDER if only_older else CHANGED
        self.column: sql.Composable = sql.SQL("")
        self.update: sql.Composable = sql.SQL("")
        self._language: sql.Composable | None = None
        if emb.text_search is None:
            return
        self._language = sql.SQL(
            "(SELECT g.text_search::regconfig FROM vectorsync.generations g "
            "WHERE g.table_schema = {} AND g.table_name = {})"
        ).format(sql.Literal(emb.target_schema), sql.Literal(emb.target_table))
        self.column = sql.SQL(", {}").format(SEARCH)
        self.update = sql.SQL(", {0} = EXCLUDED.{0}").format(SEARCH)
        if not only_older:
            self.condition = sql.SQL("{} OR t.{} IS DISTINCT FROM EXCLUDED.{}").format(CHANGED, SEARCH, SEARCH)

    def value(self, text: sql.Composable) -> sql.Composable:
        """``, to_tsvector(<language>, text)``, or nothing."""
        if self._language is None:
            return sql.SQL("")
        return sql.SQL(", to_tsvector({}, {})").format(self._language, text)


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


def fill_search(conn: psycopg.Connection, emb: Embedding) -> int:
    """Fill the keyword column of ``emb``'s generations where ``migrate`` just made it (empty): from
    a text column of the source in one statement, or, for text read from files or bytes, by
    queueing the rows so the workers read it again. Returns the rows filled or queued."""
    spec = emb.spec
    if emb.text_search is None or not isinstance(spec, TextSpec):
        return 0
    column = spec.column
    in_column = column is not None and bool(scalar(
        conn,
        "SELECT t.typcategory = 'S' FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
        (emb.source.as_string(conn), column),
    ))
    done = queued = 0
    for schema, table, state in conn.execute(
        "SELECT table_schema, table_name, state FROM vectorsync.generations "
        "WHERE embedding = %s AND text_search IS NOT NULL ORDER BY generation",
        (emb.name,),
    ).fetchall():
        generation = sql.Identifier(schema, table)
        if in_column and column is not None:
            done += conn.execute(
                sql.SQL(
                    "UPDATE {gen} t SET {search} = "
                    "to_tsvector(g.text_search::regconfig, left(coalesce(s.{col}, ''), {chars})) "
                    "FROM {src} s, vectorsync.generations g WHERE g.table_schema = %s AND g.table_name = %s "
                    "AND s.{key} = t.{key} AND t.{search} IS NULL"
                ).format(
                    gen=generation,
                    search=SEARCH,
                    col=sql.Identifier(column),
                    chars=sql.Literal(SEARCH_TEXT_CHARS),
                    src=emb.source,
                    key=emb.key,
                ),
                (schema, table),
            ).rowcount
        elif state != "retired":  # the workers write the live generations only
            queued += queue.enqueue_without_keywords(conn, emb, generation)
    if queued:
        queue.notify(conn, emb.name)
    return done + queued
