"""``vectorsync migrate``: check the specs against the database, run Alembic, reconcile embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from psycopg import sql
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from vectorsync.migrations import MIGRATIONS_DIR
from vectorsync.migrations.operations import (
    SEARCH_COLUMN,
    TARGET_COLUMNS,
    SchemaChangeError,
    create_embedding,
    drop_embedding,
)
from vectorsync.sync import capabilities, catalog, privileges, queue, sink
from vectorsync.sync.db import connect, ensure_vector_extension, scalar
from vectorsync.sync.models import current_version
from vectorsync.sync.sources import HASH, KEY
from vectorsync.sync.spec import Config, EmbeddingSpec, SpecError


class SpecMismatch(SpecError):
    """The config names tables or columns that the database does not have."""


@dataclass
class MigrateReport:
    revision_before: str | None
    revision_after: str | None
    embeddings: list[str]


def resolve_schema(conn: psycopg.Connection, spec: EmbeddingSpec) -> str:
    """The schema that holds the spec's source table (search_path decides when unqualified)."""
    if spec.source_schema:
        return spec.source_schema
    row = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (sql.Identifier(spec.source_name).as_string(conn),),
    ).fetchone()
    return row[0] if row else "public"


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str] | None:
    """Column name -> its type (``format_type``), in table order; None when the table does not exist."""
    rows = conn.execute(
        "SELECT a.attname, CASE WHEN t.typcategory = 'S' THEN 'string' ELSE format_type(a.atttypid, NULL) END "
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_type t ON t.oid = a.atttypid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return {r[0]: r[1] for r in rows} or None


#: Per modality, the input fields whose column must be of given types ("string": text, varchar...).
_TYPED_INPUTS: dict[str, dict[str, tuple[set[str], str]]] = {
    "text": {"column": ({"string", "bytea"}, "text (or bytea)"), "path_column": ({"string"}, "text (file paths)")},
    "image": {"column": ({"bytea"}, "bytea (encoded images)"), "path_column": ({"string"}, "text (file paths)")},
    "face": {"column": ({"bytea"}, "bytea (encoded images)"), "path_column": ({"string"}, "text (file paths)")},
}


def _type_problems(spec: EmbeddingSpec, columns: dict[str, str]) -> list[str]:
    """Input columns of the wrong kind (a text embedding on a numeric column), found before any sync."""
    problems = []
    for field_name, (types, what) in _TYPED_INPUTS.get(spec.modality, {}).items():
        column = getattr(spec, field_name, None)
        found = columns.get(column) if column else None
        if found is not None and found not in types:
            problems.append(
                f"embedding {spec.name!r}, field {field_name!r}: column {column!r} of table {spec.table!r} is "
                f"{found}; a {spec.modality} embedding needs {what}"
            )
    return problems


def required_columns(spec: EmbeddingSpec) -> list[tuple[str, str]]:
    """(field, column) pairs the source table must have."""
    needed = [("key", spec.key)] + [("columns", c) for c in spec.input_columns]
    label = getattr(spec, "label_column", None)
    if label:
        needed.append(("label_column", label))
    return needed


def key_is_unique(conn: psycopg.Connection, schema: str, table: str, column: str) -> bool:
    """Whether ``column`` alone is the table's primary key or carries a unique index, and is NOT NULL."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(%s) AND a.attname = %s AND a.attnotnull "
        "AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL)",
        (sql.Identifier(schema, table).as_string(conn), column),
    ).fetchone()
    return bool(row and row[0])


def name_clashes(spec: EmbeddingSpec) -> list[str]:
    """Problems with column names that vectorsync uses itself (in its row frames and target table)."""
    problems = [
        f"embedding {spec.name!r}, field 'columns': column {column!r} has a name vectorsync uses internally; "
        f"sync a view that renames it"
        for column in spec.input_columns
        if column in (KEY, HASH)
    ]
    if spec.key in TARGET_COLUMNS or spec.key in (KEY, HASH) or (
        getattr(spec, "text_search", None) is not None and spec.key == SEARCH_COLUMN
    ):
        problems.append(
            f"embedding {spec.name!r}, field 'key': key column {spec.key!r} has the name of a column of the "
            f"target table ({', '.join(TARGET_COLUMNS)}); sync a view that renames it"
        )
    return problems


def check_specs(conn: psycopg.Connection, specs: list[EmbeddingSpec]) -> None:
    """Every table and column the specs name must exist, and each key must identify one row;
    report all problems at once."""
    problems: list[str] = []
    for spec in specs:
        problems += name_clashes(spec)
        schema = resolve_schema(conn, spec)
        columns = table_columns(conn, schema, spec.source_name)
        if columns is None:
            problems.append(f"embedding {spec.name!r}: table {spec.table!r} does not exist")
            continue
        for field_name, column in required_columns(spec):
            if column not in columns:
                problems.append(
                    f"embedding {spec.name!r}, field {field_name!r}: column {column!r} not found in "
                    f"table {spec.table!r} (columns: {', '.join(columns)})"
                )
        problems.extend(_type_problems(spec, columns))
        unique = spec.key not in columns or key_is_unique(conn, schema, spec.source_name, spec.key)
        if spec.from_queue and not unique:
            problems.append(
                f"embedding {spec.name!r}, field 'key': column {spec.key!r} of table {spec.table!r} is neither "
                f"the primary key nor a NOT NULL column with a unique index of its own; add one "
                f"(e.g. ALTER TABLE ... ADD PRIMARY KEY ({spec.key})) or choose another key"
            )
        graph = getattr(spec, "graph", None)
        if graph is not None:
            gschema, gtable = graph.edges.split(".", 1) if "." in graph.edges else (schema, graph.edges)
            edge_columns = table_columns(conn, gschema, gtable)
            if edge_columns is None:
                problems.append(f"embedding {spec.name!r}, field 'graph.edges': table {graph.edges!r} does not exist")
            else:
                for field_name in ("source_column", "target_column", "weight_column"):
                    column = getattr(graph, field_name)
                    if column and column not in edge_columns:
                        problems.append(
                            f"embedding {spec.name!r}, field 'graph.{field_name}': column {column!r} "
                            f"not found in table {graph.edges!r}"
                        )
    if problems:
        raise SpecMismatch("the config does not match the database:\n  " + "\n  ".join(problems))


def _alembic(conn_url: str) -> tuple[AlembicConfig, Engine]:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg, engine_for(conn_url)


def engine_for(url: str) -> Engine:
    """A SQLAlchemy engine (psycopg 3 driver) for any libpq URL or key=value conninfo."""
    # db.connect, so an unreachable server is one DatabaseError, as for every other command
    return create_engine("postgresql+psycopg://", creator=lambda: connect(url, vector=False), poolclass=NullPool)


def serialise(conn: psycopg.Connection) -> None:
    """Wait for any other migrate of this database to commit: two at once would both create the
    extension, the schema and the same tables, and one would fail on the other's."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('vectorsync migrate', 0))")


def current_revision(conn: psycopg.Connection) -> str | None:
    exists = scalar(conn, "SELECT to_regclass('vectorsync.alembic_version')")
    if exists is None:
        return None
    row = conn.execute("SELECT version_num FROM vectorsync.alembic_version").fetchone()
    return row[0] if row else None


def upgrade(url: str, config: Config, *, recreate: list[str] | None = None) -> MigrateReport:
    """Bring the database up to the config; idempotent."""
    cfg, engine = _alembic(url)
    with engine.begin() as sa_conn:
        raw: psycopg.Connection = sa_conn.connection.driver_connection  # type: ignore[assignment]  # the driver is psycopg
        serialise(raw)
        check_specs(raw, list(config.embeddings))
        objects = [catalog.Embedding.from_spec(spec, resolve_schema(raw, spec)) for spec in config.embeddings]
        privileges.check_migrate(
            raw,
            [
                privileges.MigrateTarget(
                    o.name, (o.source_schema, o.source_table), (o.target_schema, o.target_table), o.capture
                )
                for o in objects
            ],
        )
        ensure_vector_extension(raw)
        require_storage(raw, list(config.embeddings))
        before = current_revision(raw)
        cfg.attributes["connection"] = sa_conn
        command.upgrade(cfg, "head")
        for name in recreate or []:
            config.embedding(name)
            drop_embedding(sa_conn, name)
        for spec, embedding in zip(config.embeddings, objects, strict=True):
            if create_embedding(sa_conn, embedding):
                reconcile(raw, spec)
            if embedding.text_search is not None:
                sink.fill_search(raw, catalog.load(raw, spec))
        privileges.mirror_reader_grants(raw)
        privileges.refresh_worker_grants(raw)
        after = current_revision(raw)
    engine.dispose()
    return MigrateReport(before, after, [s.name for s in config.embeddings])


#: The server feature (sync.capabilities) each storage other than ``vector`` needs.
STORAGE_FEATURES = {"halfvec": "halfvec storage", "bit": "binary quantization"}


def require_storage(conn: psycopg.Connection, specs: list[EmbeddingSpec]) -> None:
    """Refuse, in one line, a ``storage`` the server's pgvector does not have."""
    features = capabilities.detect(conn)
    for spec in specs:
        if spec.storage in STORAGE_FEATURES:
            features.require(STORAGE_FEATURES[spec.storage], f"embedding {spec.name!r}: storage = {spec.storage}")


def reconcile(conn: psycopg.Connection, spec: EmbeddingSpec) -> None:
    """After repairing a broken embedding: queue every row whose vector is missing or stale and
    remove vectors of deleted rows, since capture could not follow the table meanwhile."""
    if not spec.from_queue:
        return
    emb = catalog.load(conn, spec)
    sink.delete_orphans(conn, emb)
    queue.enqueue_backfill(conn, emb, current_version(conn, spec.name))


def downgrade(url: str) -> list[str]:
    """Remove everything vectorsync made; the user's tables and data stay. Returns dropped names."""
    cfg, engine = _alembic(url)
    dropped: list[str] = []
    with engine.begin() as sa_conn:
        raw: psycopg.Connection = sa_conn.connection.driver_connection  # type: ignore[assignment]  # the driver is psycopg
        serialise(raw)
        if current_revision(raw) is None:
            return dropped
        for (name,) in raw.execute("SELECT name FROM vectorsync.embeddings ORDER BY name").fetchall():
            drop_embedding(sa_conn, name)
            dropped.append(name)
        cfg.attributes["connection"] = sa_conn
        command.downgrade(cfg, "base")
        raw.execute("DROP SCHEMA IF EXISTS vectorsync CASCADE")
    engine.dispose()
    return dropped


__all__ = ["SchemaChangeError", "SpecMismatch", "check_specs", "downgrade", "upgrade"]
