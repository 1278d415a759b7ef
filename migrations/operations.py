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

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from alembic.operations import MigrateOperation, Operations
from psycopg import sql

from vectorsync.errors import DatabaseError

OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "inner_product": "vector_ip_ops"}

#: Settings under which keys are written as text, by the capture trigger (its function pins them,
#: revision 0006) and by every vectorsync session (sync.db.connect), so a key reads back the same
#: whatever the session that changed the row had set.
KEY_TEXT_SETTINGS = {
    "DateStyle": "ISO, YMD",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}

#: Column names vectorsync gives the target table besides the key.
TARGET_COLUMNS = ("embedding", "model_version", "input_hash", "embedded_at")


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
        return object_name(self.target_table, "_embedding_idx", unique_for=f"{self.target_schema}.{self.target_table}")


def object_name(base: str, suffix: str, *, unique_for: str) -> str:
    """``base + suffix`` when it fits Postgres's 63 bytes, else ``base`` cut and tagged with a hash
    of ``unique_for``: Postgres would cut it silently, and two long names would share one object."""
    if len((base + suffix).encode()) <= 63:
        return base + suffix
    tag = "_" + hashlib.md5(unique_for.encode()).hexdigest()[:8]
    room = 63 - len((tag + suffix).encode())
    cut = base.encode()[:room].decode(errors="ignore")
    return cut + tag + suffix


def _cursor(connection: Any) -> Any:
    """A psycopg cursor for an Alembic/SQLAlchemy connection or a psycopg connection."""
    driver = getattr(getattr(connection, "connection", None), "driver_connection", None)
    return (driver or connection).cursor()


def execute_script(connection: Any, script: str) -> None:
    """Run SQL text as written (no placeholder processing), e.g. function bodies using format('%1$I')."""
    _cursor(connection).execute(script)


def column_info(cur: Any, schema: str, table: str, column: str) -> tuple[int, str]:
    """(attribute number, declared type) of a column."""
    cur.execute(
        """
        SELECT a.attnum, format_type(a.atttypid, a.atttypmod)
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
    return row[0], row[1]


def key_type(cur: Any, schema: str, table: str, column: str) -> str:
    return column_info(cur, schema, table, column)[1]


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


def create_embedding(connection: Any, e: EmbeddingObjects, *, with_index: bool = True) -> bool:
    """Create or bring up to date everything ``e`` needs; a changed ``dim`` is refused.

    Returns True when this repaired an embedding that schema drift had marked broken: its capture
    may have missed changes meanwhile, so the caller re-queues the table against its vectors.
    """
    cur = _cursor(connection)
    key_attnum, ktype = column_info(cur, e.source_schema, e.source_table, e.key_column)
    input_attnums = [column_info(cur, e.source_schema, e.source_table, c)[0] for c in e.input_columns]
    existing_dim = target_dim(cur, e.target_schema, e.target_table)
    if existing_dim is not None and existing_dim != e.dim:
        raise SchemaChangeError(
            f"embedding {e.name!r} changes dim from {existing_dim} to {e.dim}; its vectors must be "
            f"rebuilt: run `vectorsync migrate --recreate {e.name}` (drops and re-embeds them)"
        )
    cur.execute("SELECT broken IS NOT NULL FROM vectorsync.embeddings WHERE name = %s", (e.name,))
    row = cur.fetchone()
    repaired = bool(row and row[0])
    cur.execute("SELECT to_regclass(%s)::oid", (e.source.as_string(cur),))
    source_relid = cur.fetchone()[0]
    values = asdict(e)
    cur.execute(
        """
        INSERT INTO vectorsync.embeddings (name, modality, source_schema, source_table, key_column,
            key_type, input_columns, target_schema, target_table, dim, distance, index_kind,
            ef_search, probes, spec, source_relid, key_attnum, input_attnums)
        VALUES (%(name)s, %(modality)s, %(source_schema)s, %(source_table)s, %(key_column)s,
            %(key_type)s, %(input_columns)s, %(target_schema)s, %(target_table)s, %(dim)s,
            %(distance)s, %(index_kind)s, %(ef_search)s, %(probes)s, %(spec)s, %(source_relid)s,
            %(key_attnum)s, %(input_attnums)s)
        ON CONFLICT (name) DO UPDATE SET modality = EXCLUDED.modality,
            source_schema = EXCLUDED.source_schema, source_table = EXCLUDED.source_table,
            key_column = EXCLUDED.key_column, key_type = EXCLUDED.key_type,
            input_columns = EXCLUDED.input_columns, target_schema = EXCLUDED.target_schema,
            target_table = EXCLUDED.target_table, dim = EXCLUDED.dim, distance = EXCLUDED.distance,
            index_kind = EXCLUDED.index_kind, ef_search = EXCLUDED.ef_search,
            probes = EXCLUDED.probes, spec = EXCLUDED.spec, source_relid = EXCLUDED.source_relid,
            key_attnum = EXCLUDED.key_attnum, input_attnums = EXCLUDED.input_attnums,
            broken = NULL, broken_at = NULL
        WHERE (vectorsync.embeddings.modality, vectorsync.embeddings.source_schema,
               vectorsync.embeddings.source_table, vectorsync.embeddings.key_column,
               vectorsync.embeddings.key_type, vectorsync.embeddings.input_columns,
               vectorsync.embeddings.target_schema, vectorsync.embeddings.target_table,
               vectorsync.embeddings.dim, vectorsync.embeddings.distance, vectorsync.embeddings.index_kind,
               vectorsync.embeddings.ef_search, vectorsync.embeddings.probes, vectorsync.embeddings.spec,
               vectorsync.embeddings.source_relid, vectorsync.embeddings.key_attnum,
               vectorsync.embeddings.input_attnums, vectorsync.embeddings.broken)
          IS DISTINCT FROM
              (EXCLUDED.modality, EXCLUDED.source_schema, EXCLUDED.source_table, EXCLUDED.key_column,
               EXCLUDED.key_type, EXCLUDED.input_columns, EXCLUDED.target_schema, EXCLUDED.target_table,
               EXCLUDED.dim, EXCLUDED.distance, EXCLUDED.index_kind, EXCLUDED.ef_search, EXCLUDED.probes,
               EXCLUDED.spec, EXCLUDED.source_relid, EXCLUDED.key_attnum, EXCLUDED.input_attnums, NULL::text)
        """,
        {
            **values,
            "key_type": ktype,
            "spec": json.dumps(e.spec, sort_keys=True),
            "source_relid": source_relid,
            "key_attnum": key_attnum,
            "input_attnums": input_attnums,
        },
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
    _follow_key(cur, e, ktype)
    cur.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (e.target.as_string(cur),))
    comment = f"{MANAGED_COMMENT} {e.name}"
    if cur.fetchone()[0] != comment:
        cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(e.target, sql.Literal(comment)))
    _adopt_index(cur, e)
    statement = index_statement(e)
    if with_index and statement is not None:
        cur.execute(statement)
    if e.capture:
        cur.execute("SELECT vectorsync.install_capture(%s)", (e.name,))
    return repaired


def _follow_key(cur: Any, e: EmbeddingObjects, ktype: str) -> None:
    """Give the target's key column the source key's current name and type (after the user renamed
    or retyped it); keys that do not convert need a recreate."""
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped "
        "AND a.attname <> ALL(%s) ORDER BY a.attnum LIMIT 1",
        (e.target.as_string(cur), list(TARGET_COLUMNS)),
    )
    name, declared = cur.fetchone()
    if name != e.key_column:
        cur.execute(
            sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                e.target, sql.Identifier(name), sql.Identifier(e.key_column)
            )
        )
    if declared != ktype:
        cur.execute("SAVEPOINT vectorsync_key_type")
        try:
            cur.execute(
                sql.SQL("ALTER TABLE {t} ALTER COLUMN {k} TYPE {kt} USING CAST(CAST({k} AS text) AS {kt})").format(
                    t=e.target, k=sql.Identifier(e.key_column), kt=sql.SQL(ktype)
                )
            )
        except psycopg.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT vectorsync_key_type")
            raise SchemaChangeError(
                f"embedding {e.name!r}: the stored keys do not convert from {declared} to {ktype} "
                f"({str(exc).strip().splitlines()[0]}); run `vectorsync migrate --recreate {e.name}`"
            ) from None
        cur.execute("RELEASE SAVEPOINT vectorsync_key_type")


def _adopt_index(cur: Any, e: EmbeddingObjects) -> None:
    """Rename the target's vector index to ``e.index_name`` if it was made under an older name."""
    cur.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "WHERE i.indrelid = to_regclass(%s) AND am.amname IN ('hnsw', 'ivfflat')",
        (e.target.as_string(cur),),
    )
    names = [row[0] for row in cur.fetchall()]
    if len(names) == 1 and names[0] != e.index_name:
        cur.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(e.target_schema, names[0]), sql.Identifier(e.index_name)
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
    _, _, target_schema, target_table = row
    cur.execute("SELECT vectorsync.drop_capture(%s)", (name,))
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
