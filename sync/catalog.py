"""The runtime view of an embedding: its spec plus what migrate recorded in vectorsync.embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from vectorsync.errors import DatabaseError
from vectorsync.migrations.operations import SchemaChangeError
from vectorsync.sync.spec import EmbeddingSpec


class NotMigrated(DatabaseError):
    """The embedding has no schema yet."""


class CatalogError(DatabaseError):
    """A value in vectorsync's catalogue is not what migrate records."""


@dataclass(frozen=True)
class Embedding:
    spec: EmbeddingSpec
    source_schema: str
    source_table: str
    key_column: str
    key_type: str  # a type name as PostgreSQL prints it (``regtype``), safe to compose into SQL
    target_schema: str
    target_table: str
    current_version: int | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> sql.Identifier:
        return sql.Identifier(self.source_schema, self.source_table)

    @property
    def target(self) -> sql.Identifier:
        return sql.Identifier(self.target_schema, self.target_table)

    @property
    def key(self) -> sql.Identifier:
        return sql.Identifier(self.key_column)

    @property
    def key_array_type(self) -> sql.SQL:
        """``<key type>[]`` for casting text keys (``regtype`` output is already quoted)."""
        return sql.SQL(self.key_type + "[]")

    def input_hash_expr(self, alias: str = "s") -> sql.Composed:
        """md5 of the input columns' values, the same expression everywhere."""
        if not self.spec.input_columns:
            return sql.SQL("NULL::text")
        columns = sql.SQL(", ").join(sql.Identifier(alias, c) for c in self.spec.input_columns)
        return sql.SQL("md5(ROW({}, NULL)::text)").format(columns)


def load(conn: psycopg.Connection, spec: EmbeddingSpec) -> Embedding:
    row = (
        conn.execute(
            "SELECT source_schema, source_table, key_column, key_type, target_schema, target_table, "
            "current_version, dim FROM vectorsync.embeddings WHERE name = %s",
            (spec.name,),
        ).fetchone()
        if _migrated(conn)
        else None
    )
    if row is None:
        raise NotMigrated(f"embedding {spec.name!r} has no schema yet; run `vectorsync migrate` first")
    source_schema, source_table, key_column, recorded_type, target_schema, target_table, version, dim = row
    if dim != spec.dim:
        # a model or vectors of the spec's dim would not fit the table: refuse before any work
        raise SchemaChangeError(
            f"embedding {spec.name!r} sets dim = {spec.dim} but its table {target_table!r} holds {dim}-dimensional "
            "vectors",
            hint=f"run `vectorsync migrate --recreate {spec.name}` to rebuild the table (its vectors are dropped), "
            f"or set dim = {dim} again",
        )
    return Embedding(
        spec,
        source_schema,
        source_table,
        key_column,
        _key_type(conn, spec.name, recorded_type),
        target_schema,
        target_table,
        version,
    )


def _key_type(conn: psycopg.Connection, name: str, recorded: str) -> str:
    """The recorded key type parsed as a type name (without length or precision, so casts never
    truncate a key): catalogue text must never reach SQL as written."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT %s::regtype::text", (recorded,)).fetchone()
    except psycopg.Error:
        row = None
    if row is None:
        raise CatalogError(
            f"the key type {recorded!r} recorded for embedding {name!r} is not a type name; "
            "run `vectorsync migrate` to record it again"
        )
    return str(row[0])


def _migrated(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('vectorsync.embeddings') IS NOT NULL").fetchone()[0]


def broken_reason(conn: psycopg.Connection, name: str) -> str | None:
    """Why schema drift marked the embedding broken (the DDL and what to run), or None."""
    row = conn.execute("SELECT broken FROM vectorsync.embeddings WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None
