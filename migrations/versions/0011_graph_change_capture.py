"""Change capture for graphs: what changed in a graph's node and edge tables since its last sync.

Native FastRP embeddings read ``vectorsync.graph_changes`` to recompute only the nodes a change can
reach, and skip a sync outright when nothing changed; ``vectorsync.graph_state`` records what the
stored vectors were last made from. Edge rows are logged as removed (``edge-``) and added
(``edge+``) copies of their endpoints and weight, so an update is "old row out, new row in"
without needing a key on the edge table; an update that touches no endpoint or weight logs
nothing. Node rows log their key (``node``) on insert, delete and input-column updates; a TRUNCATE
logs ``all``. The sync, not the trigger, removes the vectors of deleted nodes: only graph runs
write a FastRP target, one at a time.

Like the row capture functions, it runs as vectorsync's owner with a pinned
``search_path``, so an application role needs no right on vectorsync's objects.

Revision ID: 0011_graph_change_capture
Revises: 0010_capture_per_embedding
"""

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0011_graph_change_capture"
down_revision = "0010_capture_per_embedding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE vectorsync.graph_changes (
            id         bigserial PRIMARY KEY,
            embedding  text NOT NULL,
            kind       text NOT NULL CHECK (kind IN ('edge+', 'edge-', 'node', 'all')),
            source     text,
            target     text,
            weight     float8,
            changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute("CREATE INDEX graph_changes_embedding_id ON vectorsync.graph_changes (embedding, id)")
    op.execute(
        """
        CREATE TABLE vectorsync.graph_state (
            embedding     text PRIMARY KEY REFERENCES vectorsync.embeddings (name) ON DELETE CASCADE,
            model_version integer NOT NULL,
            params        jsonb NOT NULL,
            nodes         bigint NOT NULL,
            serial        bigint NOT NULL,
            synced_at     timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    execute_script(
        op.get_bind(),
        r"""
        CREATE FUNCTION vectorsync.capture_graph_changes() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
        DECLARE
            e vectorsync.embeddings;
            g jsonb;
            ends text;
            inputs text;
            logged bigint := 0;
        BEGIN
            SELECT * INTO e FROM vectorsync.embeddings WHERE name = TG_ARGV[0];
            IF NOT FOUND THEN
                RETURN NULL;
            END IF;
            g := e.spec -> 'graph';
            IF TG_OP = 'TRUNCATE' THEN
                INSERT INTO vectorsync.graph_changes (embedding, kind) VALUES (e.name, 'all');
                logged := 1;
            ELSIF TG_ARGV[1] = 'edges' THEN
                ends := format('x.%I::text, x.%I::text, %s', g ->> 'source_column', g ->> 'target_column',
                               CASE WHEN g ->> 'weight_column' IS NULL THEN 'NULL::float8'
                                    ELSE format('x.%I::float8', g ->> 'weight_column') END);
                IF TG_OP = 'INSERT' THEN
                    EXECUTE format('INSERT INTO vectorsync.graph_changes (embedding, kind, source, target, weight) '
                                   'SELECT $1, ''edge+'', %s FROM vs_new x', ends) USING e.name;
                ELSIF TG_OP = 'DELETE' THEN
                    EXECUTE format('INSERT INTO vectorsync.graph_changes (embedding, kind, source, target, weight) '
                                   'SELECT $1, ''edge-'', %s FROM vs_old x', ends) USING e.name;
                ELSE
                    EXECUTE format(
                        'INSERT INTO vectorsync.graph_changes (embedding, kind, source, target, weight) '
                        'SELECT $1, ''edge-'', * FROM '
                        '(SELECT %1$s FROM vs_old x EXCEPT ALL SELECT %1$s FROM vs_new x) o '
                        'UNION ALL SELECT $1, ''edge+'', * FROM '
                        '(SELECT %1$s FROM vs_new x EXCEPT ALL SELECT %1$s FROM vs_old x) n',
                        ends) USING e.name;
                END IF;
                GET DIAGNOSTICS logged = ROW_COUNT;
            ELSE
                SELECT coalesce(string_agg(format('x.%I', c), ', '), 'NULL') INTO inputs
                  FROM unnest(e.input_columns) AS c;
                IF TG_OP = 'INSERT' THEN
                    EXECUTE format('INSERT INTO vectorsync.graph_changes (embedding, kind, source) '
                                   'SELECT $1, ''node'', x.%I::text FROM vs_new x', e.key_column) USING e.name;
                ELSIF TG_OP = 'DELETE' THEN
                    EXECUTE format('INSERT INTO vectorsync.graph_changes (embedding, kind, source) '
                                   'SELECT $1, ''node'', x.%I::text FROM vs_old x', e.key_column) USING e.name;
                ELSE
                    EXECUTE format(
                        'INSERT INTO vectorsync.graph_changes (embedding, kind, source) '
                        'SELECT DISTINCT $1, ''node'', k FROM ('
                        '(SELECT x.%1$I::text AS k, ROW(%2$s)::text FROM vs_old x '
                        ' EXCEPT SELECT x.%1$I::text, ROW(%2$s)::text FROM vs_new x) '
                        'UNION (SELECT x.%1$I::text, ROW(%2$s)::text FROM vs_new x '
                        ' EXCEPT SELECT x.%1$I::text, ROW(%2$s)::text FROM vs_old x)) c(k, r)',
                        e.key_column, inputs) USING e.name;
                END IF;
                GET DIAGNOSTICS logged = ROW_COUNT;
            END IF;
            IF logged > 0 THEN
                PERFORM pg_notify('vectorsync', e.name);
            END IF;
            RETURN NULL;
        END
        $fn$
        """,
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS vectorsync.capture_graph_changes() CASCADE")
    op.execute("DROP TABLE IF EXISTS vectorsync.graph_state")
    op.execute("DROP TABLE IF EXISTS vectorsync.graph_changes")
