"""The runtime view of an embedding: its spec plus what migrate recorded in vectorsync.embeddings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from vectorsync.errors import DatabaseError
from vectorsync.migrations.operations import EmbeddingObjects, SchemaChangeError
from vectorsync.sync.spec import EmbeddingSpec, GraphEmbeddingSpec, split_qualified


class NotMigrated(DatabaseError):
    """The embedding has no schema yet."""


class CatalogError(DatabaseError):
    """A value in vectorsync's catalogue is not what migrate records."""


@dataclass(frozen=True, kw_only=True)
class Embedding(EmbeddingObjects):
    """One embedding at run time: the catalogue record derived from its spec (what ``migrate``
    writes to ``vectorsync.embeddings``), together with the validated spec itself."""

    spec: EmbeddingSpec
    #: the model version queries read, as loaded (None: no model yet)
    current_version: int | None = None

    @classmethod
    def from_spec(cls, spec: EmbeddingSpec, source_schema: str, *, key_type: str | None = None) -> Embedding:
        """The record for ``spec`` whose source table lies in ``source_schema``."""
        graph = spec.graph if isinstance(spec, GraphEmbeddingSpec) else None
        edges_schema, edges_table = split_qualified(graph.edges) if graph is not None else (None, None)
        return cls(
            name=spec.name,
            modality=spec.modality,
            source_schema=source_schema,
            source_table=spec.source_name,
            key_column=spec.key,
            input_columns=spec.input_columns,
            target_schema=(split_qualified(spec.target)[0] if spec.target else None) or source_schema,
            target_table=spec.target_name,
            dim=spec.dim,
            distance=spec.distance,
            storage=spec.storage,
            index_kind=spec.index.kind,
            m=spec.index.m,
            ef_construction=spec.index.ef_construction,
            ef_search=spec.index.ef_search,
            lists=spec.index.lists,
            probes=spec.index.probes,
            capture=not isinstance(spec, GraphEmbeddingSpec) or graph is not None,
            encoder_type=spec.encoder_type,
            edges_schema=edges_schema or source_schema if graph is not None else None,
            edges_table=edges_table,
            graph_capture=graph is not None,
            text_search=text_search.language if (text_search := getattr(spec, "text_search", None)) else None,
            key_type=key_type,
            spec=spec,
        )

    def spec_json(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")

    @property
    def key_sql_type(self) -> sql.SQL:
        """The key's type for casts (``regtype`` output is already quoted)."""
        if self.key_type is None:
            raise NotMigrated(f"embedding {self.name!r} has no schema yet; run `vectorsync migrate` first")
        return sql.SQL(self.key_type)

    @property
    def key_array_type(self) -> sql.Composed:
        """``<key type>[]`` for casting text keys."""
        return sql.SQL("{}[]").format(self.key_sql_type)

    @property
    def shape(self) -> tuple[Any, ...]:
        """Everything the statements composed for this embedding depend on: embeddings of equal
        shape get equal statements (see ``statement``)."""
        return (
            self.name, self.source_schema, self.source_table, self.key_column, self.key_type,
            tuple(self.input_columns), self.target_schema, self.target_table, self.text_search,
        )

    def input_hash_expr(self, alias: str = "s") -> sql.Composed | sql.SQL:
        """md5 of the input columns' values, the same expression everywhere."""
        if not self.input_columns:
            return sql.SQL("NULL::text")
        columns = sql.SQL(", ").join(sql.Identifier(alias, c) for c in self.input_columns)
        return sql.SQL("md5(ROW({}, NULL)::text)").format(columns)


#: Statements already composed, by what they depend on (``statement``).
_STATEMENTS: dict[tuple[Any, ...], sql.SQL] = {}
#: Past this many, the composed statements are forgotten (the catalogue changed many times).
_STATEMENTS_KEPT = 512


def statement(key: tuple[Any, ...], compose: Callable[[], sql.Composable]) -> sql.SQL:
    """``compose()``'s statement, rendered once per ``key`` (which must hold everything it depends
    on, such as an ``Embedding.shape``) as one string: psycopg walks a composed statement on every
    execution, which costs a lone change's batch about a tenth of its CPU."""
    found = _STATEMENTS.get(key)
    if found is None:
        if len(_STATEMENTS) >= _STATEMENTS_KEPT:
            _STATEMENTS.clear()
        found = _STATEMENTS[key] = sql.SQL(compose().as_string(None))
    return found


def load(conn: psycopg.Connection, spec: EmbeddingSpec) -> Embedding:
    """The embedding as its generation in service stores it: ``target`` is that generation's table
    and ``current_version`` its model version (vectorsync.sync.generations binds the others)."""
    row = (
        conn.execute(
            "SELECT e.source_schema, e.source_table, e.key_column, e.key_type, g.table_schema, g.table_name, e.dim, "
            "g.model_version FROM vectorsync.embeddings e "
            "JOIN vectorsync.generations g ON g.embedding = e.name AND g.state = 'serving' WHERE e.name = %s",
            (spec.name,),
        ).fetchone()
        if _migrated(conn)
        else None
    )
    if row is None:
        raise NotMigrated(f"embedding {spec.name!r} has no schema yet; run `vectorsync migrate` first")
    source_schema, source_table, key_column, recorded_type, target_schema, target_table, dim, version = row
    if dim != spec.dim:
        # a model of the spec's dim would have no generation to embed into: refuse before any work
        raise SchemaChangeError(
            f"embedding {spec.name!r} sets dim = {spec.dim} but was migrated with dim = {dim}",
            hint=f"run `vectorsync migrate`: it starts a generation of the new dim while dim = {dim} keeps serving",
        )
    # what migrate recorded wins over the spec: a spec edited since is not in the database yet
    return replace(
        Embedding.from_spec(spec, source_schema, key_type=_key_type(conn, spec.name, recorded_type)),
        source_table=source_table,
        key_column=key_column,
        target_schema=target_schema,
        target_table=target_table,
        current_version=version,
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
    row = conn.execute("SELECT to_regclass('vectorsync.embeddings') IS NOT NULL").fetchone()
    return bool(row and row[0])


def broken_reason(conn: psycopg.Connection, name: str) -> str | None:
    """Why schema drift marked the embedding broken (the DDL and what to run), or None."""
    row = conn.execute("SELECT broken FROM vectorsync.embeddings WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


def recorded_inputs(conn: psycopg.Connection, name: str) -> list[str] | None:
    """The input columns ``migrate`` last recorded for ``name``; None when it is not migrated."""
    row = conn.execute("SELECT input_columns FROM vectorsync.embeddings WHERE name = %s", (name,)).fetchone()
    return list(row[0]) if row else None


def fingerprint(conn: psycopg.Connection, name: str) -> str | None:
    """A value that changes whenever anything a batch of ``name`` relies on changes in the
    catalogue (its record, broken mark, live generations and their models), in one round trip;
    None when the embedding is not migrated.

    Row versions (``xmin``) rather than contents: a record rewritten with the same values (``migrate
    --recreate``, a model retrained under the same version number) still changes the fingerprint.
    """
    try:
        row = conn.execute(
            """
            SELECT e.xmin::text || ';' || coalesce((
                SELECT string_agg(concat_ws(':', g.generation, g.xmin, m.xmin), ',' ORDER BY g.generation)
                FROM vectorsync.generations g
                LEFT JOIN vectorsync.models m ON m.embedding = g.embedding AND m.version = g.model_version
                WHERE g.embedding = e.name AND g.state IN ('serving', 'building')), '')
            FROM vectorsync.embeddings e WHERE e.name = %s
            """,
            (name,),
        ).fetchone()
    except psycopg.errors.UndefinedTable:  # vectorsync's schema is gone; ``load`` says what to do
        return None
    return str(row[0]) if row else None
