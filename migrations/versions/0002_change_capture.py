"""Change capture: the statement-level trigger function that feeds the queue.

One function serves every embedding; its triggers pass the embedding name and it reads the key,
input columns and target from ``vectorsync.embeddings``. Transition tables make bulk statements
enqueue with one set-based INSERT instead of one per row. Updates enqueue only rows whose input
columns changed; deletes and key changes remove embeddings; TRUNCATE clears them. Failed items of
deleted rows go with them.

Revision ID: 0002_change_capture
Revises: 0001_internal_schema
"""

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0002_change_capture"
down_revision = "0001_internal_schema"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # exec_driver_sql: the body holds format() patterns such as %1$I that must reach Postgres as written
    execute_script(
        op.get_bind(),
        r"""
        CREATE FUNCTION vectorsync.capture_changes() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        DECLARE
            e vectorsync.embeddings;
            changed text;
            queued bigint := 0;
        BEGIN
            SELECT * INTO e FROM vectorsync.embeddings WHERE name = TG_ARGV[0];
            IF NOT FOUND THEN
                RETURN NULL;
            END IF;
            IF TG_OP = 'INSERT' THEN
                EXECUTE format(
                    'INSERT INTO vectorsync.queue (embedding, key) SELECT $1, n.%1$I::text FROM vs_new n',
                    e.key_column) USING e.name;
                GET DIAGNOSTICS queued = ROW_COUNT;
            ELSIF TG_OP = 'UPDATE' THEN
                SELECT string_agg(format('o.%1$I IS DISTINCT FROM n.%1$I', c), ' OR ')
                  INTO changed FROM unnest(e.input_columns) AS c;
                EXECUTE format(
                    'INSERT INTO vectorsync.queue (embedding, key) SELECT $1, n.%1$I::text '
                    'FROM vs_new n LEFT JOIN vs_old o ON o.%1$I = n.%1$I '
                    'WHERE o.%1$I IS NULL OR %2$s',
                    e.key_column, coalesce(changed, 'false')) USING e.name;
                GET DIAGNOSTICS queued = ROW_COUNT;
                EXECUTE format(
                    'DELETE FROM %1$I.%2$I t USING vs_old o WHERE t.%3$I = o.%3$I '
                    'AND NOT EXISTS (SELECT 1 FROM vs_new n WHERE n.%3$I = o.%3$I)',
                    e.target_schema, e.target_table, e.key_column);
            ELSIF TG_OP = 'DELETE' THEN
                EXECUTE format(
                    'DELETE FROM %1$I.%2$I t USING vs_old o WHERE t.%3$I = o.%3$I',
                    e.target_schema, e.target_table, e.key_column);
                EXECUTE format(
                    'DELETE FROM vectorsync.failed f USING vs_old o WHERE f.embedding = $1 AND f.key = o.%1$I::text',
                    e.key_column) USING e.name;
            ELSIF TG_OP = 'TRUNCATE' THEN
                EXECUTE format('TRUNCATE %1$I.%2$I', e.target_schema, e.target_table);
                DELETE FROM vectorsync.queue WHERE embedding = e.name;
                DELETE FROM vectorsync.failed WHERE embedding = e.name;
            END IF;
            IF queued > 0 THEN
                PERFORM pg_notify('vectorsync', e.name);
            END IF;
            RETURN NULL;
        END
        $fn$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS vectorsync.capture_changes() CASCADE")
