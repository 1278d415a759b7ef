"""Per-embedding schema objects as Alembic operations.

An embedding owns a target table (the source key, ``embedding vector(dim)``, ``model_version``,
``input_hash``, ``embedded_at``), its vector index, a row in ``vectorsync.embeddings`` and the
change-capture triggers on its source table. ``create_embedding`` is idempotent: running it twice
changes nothing. Users with their own Alembic history can call the registered operations::

    from vectorsync.migrations.operations import EmbeddingObjects  # registers the operations
    op.create_vectorsync_embedding(EmbeddingObjects(name="items", source_table="items", ...))

Every identifier is composed with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from alembic.operations import MigrateOperation, Operations
from psycopg import sql

from vectorsync.errors import DatabaseError

OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "inner_product": "vector_ip_ops"}
TRIGGER_EVENTS = {
    "insert": "AFTER INSERT ON {table} REFERENCING NEW TABLE AS vs_new FOR EACH STATEMENT",
    "update": "AFTER UPDATE ON {table} REFERENCING OLD TABLE AS vs_old NEW TABLE AS vs_new FOR EACH STATEMENT",
    "delete": "AFTER DELETE ON {table} REFERENCING OLD TABLE AS vs_old FOR EACH STATEMENT",
    "truncate": "AFTER TRUNCATE ON {table} FOR EACH STATEMENT",
}


#: Target tables carry this comment so autogenerate filters (migrations.autogenerate) can skip them.
MANAGED_COMMENT = "vectorsync: embeddings of"


class SchemaChangeError(DatabaseError):
    """The database does not match what the embedding needs and vectorsync will not guess."""


@dataclass(frozen=True)
class EmbeddingObjects:
    """What one embedding needs in the database (plain values, so revisions can hold them)."""

    name: str
    source_schema: str
    source_table: str
    key_column: str
    input_columns: list[str]
    target_schema: str
    target_table: str
    dim: int
    modality: str = "tabular"
    distance: str = "cosine"
    index_kind: str = "hnsw"
    m: int = 16
    ef_construction: int = 64
    ef_search: int = 40
    lists: int | None = None
    probes: int = 10
    capture: bool = True
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> sql.Identifier:
        return sql.Identifier(self.source_schema, self.source_table)

    @property
    def target(self) -> sql.Identifier:
        return sql.Identifier(self.target_schema, self.target_table)

    @property
    def index_name(self) -> str:
        return f"{self.target_table[:50]}_embedding_idx"


def _cursor(connection: Any) -> Any:
    """A psycopg cursor for an Alembic/SQLAlchemy connection or a psycopg connection."""
    driver = getattr(getattr(connection, "connection", None), "driver_connection", None)
    return (driver or connection).cursor()


def execute_script(connection: Any, script: str) -> None:
    """Run SQL text as written (no placeholder processing), e.g. function bodies using format('%1$I')."""
    _cursor(connection).execute(script)


def key_type(cur: Any, schema: str, table: str, column: str) -> str:
    cur.execute(
        """
        SELECT format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped
        """,
        (schema, table, column),
    )
    row = cur.fetchone()
    if row is None:
        raise SchemaChangeError(f"column {column!r} not found in table {schema}.{table}")
    return row[0]


def target_dim(cur: Any, schema: str, table: str) -> int | None:
    """The dimension of an existing target table's vector column, or None if there is no table."""
    try:
        declared = key_type(cur, schema, table, "embedding")
    except SchemaChangeError:
        return None
    inside = declared.partition("(")[2].rstrip(")")
    return int(inside) if inside.isdigit() else None


def index_statement(e: EmbeddingObjects, rows: int = 0) -> sql.Composed | None:
    """CREATE INDEX for the target; IVFFlat lists default to rows/1000 (at least 10)."""
    if e.index_kind == "none":
        return None
    opclass = sql.SQL(OPCLASS[e.distance])
    if e.index_kind == "hnsw":
        method = sql.SQL("hnsw")
        options = sql.SQL("m = {}, ef_construction = {}").format(sql.Literal(e.m), sql.Literal(e.ef_construction))
    else:
        method = sql.SQL("ivfflat")
        lists = e.lists or max(10, rows // 1000)
        options = sql.SQL("lists = {}").format(sql.Literal(lists))
    return sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING {} (embedding {}) WITH ({})").format(
        sql.Identifier(e.index_name), e.target, method, opclass, options
    )


def create_embedding(connection: Any, e: EmbeddingObjects, *, with_index: bool = True) -> None:
    """Create or bring up to date everything ``e`` needs; a changed ``dim`` is refused."""
    cur = _cursor(connection)
    ktype = key_type(cur, e.source_schema, e.source_table, e.key_column)
    existing_dim = target_dim(cur, e.target_schema, e.target_table)
    if existing_dim is not None and existing_dim != e.dim:
        raise SchemaChangeError(
            f"embedding {e.name!r} changes dim from {existing_dim} to {e.dim}; its vectors must be "
            f"rebuilt: run `vectorsync migrate --recreate {e.name}` (drops and re-embeds them)"
        )
    values = asdict(e)
    cur.execute(
        """
        INSERT INTO vectorsync.embeddings (name, modality, source_schema, source_table, key_column,
            key_type, input_columns, target_schema, target_table, dim, distance, index_kind,
            ef_search, probes, spec)
        VALUES (%(name)s, %(modality)s, %(source_schema)s, %(source_table)s, %(key_column)s,
            %(key_type)s, %(input_columns)s, %(target_schema)s, %(target_table)s, %(dim)s,
            %(distance)s, %(index_kind)s, %(ef_search)s, %(probes)s, %(spec)s)
        ON CONFLICT (name) DO UPDATE SET modality = EXCLUDED.modality,
            source_schema = EXCLUDED.source_schema, source_table = EXCLUDED.source_table,
            key_column = EXCLUDED.key_column, key_type = EXCLUDED.key_type,
            input_columns = EXCLUDED.input_columns, target_schema = EXCLUDED.target_schema,
            target_table = EXCLUDED.target_table, dim = EXCLUDED.dim, distance = EXCLUDED.distance,
            index_kind = EXCLUDED.index_kind, ef_search = EXCLUDED.ef_search,
            probes = EXCLUDED.probes, spec = EXCLUDED.spec
        WHERE (vectorsync.embeddings.modality, vectorsync.embeddings.source_schema,
               vectorsync.embeddings.source_table, vectorsync.embeddings.key_column,
               vectorsync.embeddings.key_type, vectorsync.embeddings.input_columns,
               vectorsync.embeddings.target_schema, vectorsync.embeddings.target_table,
               vectorsync.embeddings.dim, vectorsync.embeddings.distance, vectorsync.embeddings.index_kind,
               vectorsync.embeddings.ef_search, vectorsync.embeddings.probes, vectorsync.embeddings.spec)
          IS DISTINCT FROM
              (EXCLUDED.modality, EXCLUDED.source_schema, EXCLUDED.source_table, EXCLUDED.key_column,
               EXCLUDED.key_type, EXCLUDED.input_columns, EXCLUDED.target_schema, EXCLUDED.target_table,
               EXCLUDED.dim, EXCLUDED.distance, EXCLUDED.index_kind, EXCLUDED.ef_search, EXCLUDED.probes,
               EXCLUDED.spec)
        """,
        {**values, "key_type": ktype, "spec": json.dumps(e.spec, sort_keys=True)},
    )
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(e.target_schema)))
    cur.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {target} (
                {key} {ktype} PRIMARY KEY,
                embedding vector({dim}) NOT NULL,
                model_version integer NOT NULL,
                input_hash text,
                embedded_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(
            target=e.target,
            key=sql.Identifier(e.key_column),
            ktype=sql.SQL(ktype),  # format_type() output: already a valid, quoted type name
            dim=sql.Literal(e.dim),
        )
    )
    cur.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (e.target.as_string(cur),))
    comment = f"{MANAGED_COMMENT} {e.name}"
    if cur.fetchone()[0] != comment:
        cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(e.target, sql.Literal(comment)))
    statement = index_statement(e)
    if with_index and statement is not None:
        cur.execute(statement)
    if e.capture:
        install_triggers(cur, e)


def install_triggers(cur: Any, e: EmbeddingObjects) -> None:
    """Create the missing capture triggers; they are generic (the function reads the catalogue),
    so an existing trigger is already right and is left alone."""
    cur.execute(
        "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (e.source_schema, e.source_table),
    )
    existing = {row[0] for row in cur.fetchall()}
    for event, clause in TRIGGER_EVENTS.items():
        if f"vectorsync_{e.name}_{event}" in existing:
            continue
        trigger = sql.Identifier(f"vectorsync_{e.name}_{event}")
        cur.execute(
            sql.SQL("CREATE TRIGGER {} " + clause + " EXECUTE FUNCTION vectorsync.capture_changes({})").format(
                trigger, sql.Literal(e.name), table=e.source
            )
        )


def drop_embedding(connection: Any, name: str) -> bool:
    """Remove the triggers, target table and bookkeeping of embedding ``name``; the source stays."""
    cur = _cursor(connection)
    cur.execute(
        "SELECT source_schema, source_table, target_schema, target_table FROM vectorsync.embeddings WHERE name = %s",
        (name,),
    )
    row = cur.fetchone()
    if row is None:
        return False
    source_schema, source_table, target_schema, target_table = row
    cur.execute("SELECT to_regclass(%s)", (sql.Identifier(source_schema, source_table).as_string(cur),))
    if cur.fetchone()[0] is not None:
        for event in TRIGGER_EVENTS:
            cur.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(f"vectorsync_{name}_{event}"), sql.Identifier(source_schema, source_table)
                )
            )
    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(target_schema, target_table)))
    for table in ("queue", "failed", "errors", "runs"):
        cur.execute(sql.SQL("DELETE FROM {} WHERE embedding = %s").format(sql.Identifier("vectorsync", table)), (name,))
    cur.execute("DELETE FROM vectorsync.embeddings WHERE name = %s", (name,))
    return True


@Operations.register_operation("create_vectorsync_embedding")
class CreateEmbeddingOp(MigrateOperation):
    """``op.create_vectorsync_embedding(EmbeddingObjects(...))``."""

    def __init__(self, objects: EmbeddingObjects) -> None:
        self.objects = objects

    @classmethod
    def create_vectorsync_embedding(cls, operations: Operations, objects: EmbeddingObjects) -> None:
        return operations.invoke(cls(objects))

    def reverse(self) -> DropEmbeddingOp:
        return DropEmbeddingOp(self.objects.name)


@Operations.register_operation("drop_vectorsync_embedding")
class DropEmbeddingOp(MigrateOperation):
    """``op.drop_vectorsync_embedding("items")``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def drop_vectorsync_embedding(cls, operations: Operations, name: str) -> None:
        return operations.invoke(cls(name))


@Operations.implementation_for(CreateEmbeddingOp)
def _create(operations: Operations, operation: CreateEmbeddingOp) -> None:
    create_embedding(operations.get_bind(), operation.objects)


@Operations.implementation_for(DropEmbeddingOp)
def _drop(operations: Operations, operation: DropEmbeddingOp) -> None:
    drop_embedding(operations.get_bind(), operation.name)
