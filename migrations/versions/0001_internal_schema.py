"""Internal schema: embedding catalogue, model registry, queue, failed items, errors, workers, runs.

Revision ID: 0001_internal_schema
Revises:
"""

from alembic import op

revision = "0001_internal_schema"
down_revision = None
branch_labels = ("vectorsync",)
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS vectorsync")
    op.execute(
        """
        CREATE TABLE vectorsync.embeddings (
            name            text PRIMARY KEY,
            modality        text NOT NULL,
            source_schema   text NOT NULL,
            source_table    text NOT NULL,
            key_column      text NOT NULL,
            key_type        text NOT NULL,
            input_columns   text[] NOT NULL,
            target_schema   text NOT NULL,
            target_table    text NOT NULL,
            dim             integer NOT NULL CHECK (dim > 0),
            distance        text NOT NULL CHECK (distance IN ('cosine', 'l2', 'inner_product')),
            index_kind      text NOT NULL,
            ef_search       integer,
            probes          integer,
            spec            jsonb NOT NULL,
            current_version integer,
            last_sync       timestamptz,
            created_at      timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE vectorsync.models (
            embedding    text NOT NULL REFERENCES vectorsync.embeddings (name) ON DELETE CASCADE,
            version      integer NOT NULL,
            encoder_type text NOT NULL,
            dim          integer NOT NULL,
            weights      bytea NOT NULL,
            metrics      jsonb NOT NULL DEFAULT '{}',
            params       jsonb NOT NULL DEFAULT '{}',
            trained_rows bigint,
            created_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (embedding, version)
        )
        """
    )
    # One row per captured change; a key may appear more than once and is embedded once per claim.
    op.execute(
        """
        CREATE TABLE vectorsync.queue (
            id          bigserial PRIMARY KEY,
            embedding   text NOT NULL,
            key         text NOT NULL,
            enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            attempts    integer NOT NULL DEFAULT 0,
            not_before  timestamptz NOT NULL DEFAULT '-infinity',
            last_error  text
        )
        """
    )
    op.execute("CREATE INDEX queue_embedding_id ON vectorsync.queue (embedding, id)")
    op.execute("CREATE INDEX queue_embedding_key ON vectorsync.queue (embedding, key)")
    op.execute(
        """
        CREATE TABLE vectorsync.failed (
            embedding   text NOT NULL,
            key         text NOT NULL,
            column_name text,
            error       text NOT NULL,
            attempts    integer NOT NULL,
            failed_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (embedding, key)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE vectorsync.errors (
            id          bigserial PRIMARY KEY,
            embedding   text NOT NULL,
            key         text,
            column_name text,
            error       text NOT NULL,
            attempt     integer,
            occurred_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX errors_embedding_time ON vectorsync.errors (embedding, occurred_at)")
    op.execute(
        """
        CREATE TABLE vectorsync.workers (
            id           text PRIMARY KEY,
            hostname     text NOT NULL,
            pid          integer NOT NULL,
            embeddings   text[] NOT NULL,
            started_at   timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            embedded     bigint NOT NULL DEFAULT 0,
            failed       bigint NOT NULL DEFAULT 0,
            status       text NOT NULL DEFAULT 'running'
        )
        """
    )
    op.execute(
        """
        CREATE TABLE vectorsync.runs (
            id          bigserial PRIMARY KEY,
            embedding   text NOT NULL,
            kind        text NOT NULL,
            started_at  timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            embedded    bigint NOT NULL DEFAULT 0,
            unchanged   bigint NOT NULL DEFAULT 0,
            deleted     bigint NOT NULL DEFAULT 0,
            failed      bigint NOT NULL DEFAULT 0,
            details     jsonb NOT NULL DEFAULT '{}'
        )
        """
    )


def downgrade() -> None:
    for table in ("runs", "workers", "errors", "failed", "queue", "models", "embeddings"):
        op.execute(f"DROP TABLE IF EXISTS vectorsync.{table}")
