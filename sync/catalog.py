"""The runtime view of an embedding: its spec plus what migrate recorded in vectorsync.embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from vectorsync.errors import DatabaseError
from vectorsync.sync.spec import EmbeddingSpec


class NotMigrated(DatabaseError):
    """The embedding has no schema yet."""


@dataclass(frozen=True)
class Embedding:
    spec: EmbeddingSpec
    source_schema: str
    source_table: str
    key_column: str
    key_type: str
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
        """``<key type>[]`` for casting text keys (format_type() output is already quoted)."""
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
            "current_version FROM vectorsync.embeddings WHERE name = %s",
            (spec.name,),
        ).fetchone()
        if _migrated(conn)
        else None
    )
    if row is None:
        raise NotMigrated(f"embedding {spec.name!r} has no schema yet; run `vectorsync migrate` first")
    return Embedding(spec, *row)


def _migrated(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('vectorsync.embeddings') IS NOT NULL").fetchone()[0]
