"""GraphSAGE change capture: changed nodes and both ends of changed edges go to the queue.

Replaces ``vectorsync.capture_graph_changes`` of 0011 (same body plus the GraphSAGE branch): for an
embedding whose encoder is GraphSAGE, inserted, deleted or updated edges queue their endpoints in
``vectorsync.queue`` (a TRUNCATE of the edges queues every node), inserted and deleted nodes and
nodes whose key or feature columns changed queue their key (a TRUNCATE of the nodes empties the
target), and the workers recompute those vectors with the current model, without retraining.

Revision ID: 0016_graphsage_capture
Revises: 0015_generations
"""

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0016_graphsage_capture"
down_revision = "0015_generations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(
        op.get_bind(),
        r"""
        CREATE OR REPLACE FUNCTION vectorsync.capture_graph_changes() RETURNS trigger
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
            IF e.spec -> 'encoder' ->> 'type' = 'graphsage' THEN
                IF TG_OP = 'TRUNCATE' AND TG_ARGV[1] = 'edges' THEN
                    EXECUTE format('INSERT INTO vectorsync.queue (embedding, key) '
                                   'SELECT $1, s.%1$I::text FROM %2$I.%3$I s',
                                   e.key_column, e.source_schema, e.source_table) USING e.name;
                ELSIF TG_OP = 'TRUNCATE' THEN
                    EXECUTE format('DELETE FROM %1$I.%2$I', e.target_schema, e.target_table);  -- a view: row-wise
                    DELETE FROM vectorsync.queue WHERE embedding = e.name;
                ELSIF TG_ARGV[1] = 'edges' THEN
                    ends := format('SELECT x.%1$I::text AS k FROM %3$s x UNION SELECT x.%2$I::text FROM %3$s x',
                                   g ->> 'source_column', g ->> 'target_column', '%1$s');
                    EXECUTE format(
                        'INSERT INTO vectorsync.queue (embedding, key) SELECT $1, k FROM ('
                        || CASE TG_OP WHEN 'INSERT' THEN format(ends, 'vs_new')
                                      WHEN 'DELETE' THEN format(ends, 'vs_old')
                                      ELSE format(ends, 'vs_new') || ' UNION ' || format(ends, 'vs_old') END
                        || ') c WHERE k IS NOT NULL') USING e.name;
                ELSE
                    -- a node's key is queued on insert, delete (the worker then removes its vector)
                    -- and a change of its key or feature columns
                    SELECT coalesce(string_agg(format('x.%I', c), ', '), 'NULL') INTO inputs
                      FROM unnest(e.input_columns) AS c;
                    EXECUTE format(
                        'INSERT INTO vectorsync.queue (embedding, key) SELECT DISTINCT $1, k FROM ('
                        || CASE TG_OP
                           WHEN 'INSERT' THEN 'SELECT x.%1$I::text AS k FROM vs_new x'
                           WHEN 'DELETE' THEN 'SELECT x.%1$I::text AS k FROM vs_old x'
                           ELSE '(SELECT x.%1$I::text AS k, ROW(%2$s)::text FROM vs_old x '
                                ' EXCEPT SELECT x.%1$I::text, ROW(%2$s)::text FROM vs_new x) '
                                'UNION (SELECT x.%1$I::text, ROW(%2$s)::text FROM vs_new x '
                                ' EXCEPT SELECT x.%1$I::text, ROW(%2$s)::text FROM vs_old x)' END
                        || ') c', e.key_column, inputs) USING e.name;
                END IF;
                GET DIAGNOSTICS logged = ROW_COUNT;
            ELSIF TG_OP = 'TRUNCATE' THEN
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
    execute_script(
        op.get_bind(),
        r"""
        CREATE OR REPLACE FUNCTION vectorsync.capture_graph_changes() RETURNS trigger
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


