"""Model generations: ``vectorsync.generations``, one physical table per generation, and the
target name as a view over the generation in service.

A new model version (or a new dim, distance or encoder) is embedded into a new generation while
queries keep reading the one in service; swapping replaces the view in one transaction. Existing
target tables become generation 1 of their embedding (moved into the vectorsync schema as
``<name>_g1``) and a view with their name takes their place. ``vectorsync._embedding`` resolves
the generation in service once per query, so each query reads one generation's table in every
statement it runs; the capture functions empty the view row-wise on TRUNCATE (a view cannot be
truncated).

Revision ID: 0015_generations
Revises: 0014_iterative_scan
"""

from alembic import op

from vectorsync.migrations.operations import execute_script
from vectorsync.migrations.replaceable import Function, replace

revision = "0015_generations"
down_revision = "0014_iterative_scan"
branch_labels = None
depends_on = None

GENERATIONS = """
CREATE TABLE vectorsync.generations (
    embedding     text NOT NULL REFERENCES vectorsync.embeddings (name) ON DELETE CASCADE ON UPDATE CASCADE,
    generation    integer NOT NULL CHECK (generation > 0),
    model_version integer,
    dim           integer NOT NULL CHECK (dim > 0),
    distance      text NOT NULL CHECK (distance IN ('cosine', 'l2', 'inner_product')),
    encoder_type  text NOT NULL,
    state         text NOT NULL CHECK (state IN ('building', 'serving', 'retired')),
    table_schema  text NOT NULL,
    table_name    text NOT NULL,
    backfilled_to text,
    backfill_done boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    serving_since timestamptz,
    retired_at    timestamptz,
    PRIMARY KEY (embedding, generation)
);
CREATE UNIQUE INDEX generations_one_serving ON vectorsync.generations (embedding) WHERE state = 'serving';
CREATE UNIQUE INDEX generations_one_building ON vectorsync.generations (embedding) WHERE state = 'building';
"""

# Each existing target table becomes generation 1; a view with its name reads it.
ADOPT_TARGETS = r"""
DO $do$
DECLARE
    e vectorsync.embeddings;
    physical text;
BEGIN
    FOR e IN SELECT * FROM vectorsync.embeddings ORDER BY name LOOP
        physical := e.name || '_g1';
        IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(format('%I.%I', e.target_schema, e.target_table)))
           IS DISTINCT FROM 'r' THEN
            CONTINUE;
        END IF;
        EXECUTE format('ALTER TABLE %I.%I RENAME TO %I', e.target_schema, e.target_table, physical);
        EXECUTE format('ALTER TABLE %I.%I SET SCHEMA vectorsync', e.target_schema, physical);
        EXECUTE format('ALTER INDEX IF EXISTS vectorsync.%I RENAME TO %I',
                       left(e.target_table, 50) || '_embedding_idx', physical || '_embedding_idx');
        EXECUTE format('CREATE VIEW %I.%I AS SELECT %I, embedding::vector AS embedding, model_version, input_hash, '
                       'embedded_at FROM vectorsync.%I', e.target_schema, e.target_table, e.key_column, physical);
        EXECUTE format('COMMENT ON VIEW %I.%I IS %L', e.target_schema, e.target_table,
                       'vectorsync: embeddings of ' || e.name);
        INSERT INTO vectorsync.generations (embedding, generation, model_version, dim, distance, encoder_type,
                                            state, table_schema, table_name, backfill_done, started_at, serving_since)
        VALUES (e.name, 1, e.current_version, e.dim, e.distance,
                coalesce((SELECT m.encoder_type FROM vectorsync.models m
                          WHERE m.embedding = e.name AND m.version = e.current_version), ''),
                'serving', 'vectorsync', physical, true, now(), now());
    END LOOP;
END
$do$
"""

RESTORE_TARGETS = r"""
DO $do$
DECLARE
    e vectorsync.embeddings;
    g vectorsync.generations;
BEGIN
    FOR e IN SELECT * FROM vectorsync.embeddings ORDER BY name LOOP
        EXECUTE format('DROP VIEW IF EXISTS %I.%I', e.target_schema, e.target_table);
        FOR g IN SELECT * FROM vectorsync.generations WHERE embedding = e.name LOOP
            IF g.state = 'serving' THEN
                EXECUTE format('ALTER INDEX IF EXISTS %I.%I RENAME TO %I', g.table_schema,
                               left(g.table_name, 50) || '_embedding_idx',
                               left(e.target_table, 50) || '_embedding_idx');
                EXECUTE format('ALTER TABLE %I.%I RENAME TO %I', g.table_schema, g.table_name, e.target_table);
                EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', g.table_schema, e.target_table, e.target_schema);
            ELSE
                EXECUTE format('DROP TABLE IF EXISTS %I.%I', g.table_schema, g.table_name);
            END IF;
        END LOOP;
    END LOOP;
END
$do$
"""

_embedding = Function(
    "vectorsync._embedding",
    "embedding_name text",
    "vectorsync.embeddings",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    e vectorsync.embeddings;
    g vectorsync.generations;
    source regclass;
BEGIN
    SELECT * INTO e FROM vectorsync.embeddings WHERE name = embedding_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vectorsync: no embedding named %', embedding_name
            USING HINT = 'SELECT name FROM vectorsync.embeddings lists them';
    END IF;
    source := vectorsync._source(e);
    IF NOT has_table_privilege(source, 'SELECT') THEN
        RAISE EXCEPTION 'vectorsync: permission denied for table %, the source of embedding %', source, e.name
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a role that may SELECT from the source table may query its embeddings';
    END IF;
    -- Read once per query: every statement of the query then reads this generation's table, so a
    -- swap committed meanwhile cannot put vectors of two models into one answer.
    SELECT * INTO g FROM vectorsync.generations WHERE embedding = embedding_name AND state = 'serving';
    IF FOUND THEN
        e.target_schema := g.table_schema;
        e.target_table := g.table_name;
        e.dim := g.dim;
        e.distance := g.distance;
    END IF;
    RETURN e;
END
""",
)

# 0013's install_capture, except that a TRUNCATE of the source empties the target row-wise: the
# target is now a view, which cannot be truncated. (A generation being built drops the vectors of
# rows that are gone when it is swapped in.)
install_capture = Function(
    "vectorsync.install_capture",
    "embedding_name text",
    "void",
    "LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp",
    r"""
DECLARE
    e vectorsync.embeddings;
    fn_name text := vectorsync._object_name('capture_', embedding_name, '');
    fn regprocedure;
    root_name text;
    key_name name;
    key_typid oid;
    key_typ text;
    eq text;
    inputs text;
    tgt text;
    enqueue_update text;
    drop_vanished text;
    any_vanished text;
    drop_deleted text;
    drop_failed text;
    body text;
    part record;
    ev record;
    trigger_name text;
    existing record;
BEGIN
    SELECT * INTO e FROM vectorsync.embeddings WHERE name = embedding_name;
    IF NOT FOUND OR e.source_relid IS NULL OR e.modality = 'graph'
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = e.source_relid) THEN
        RETURN;
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO root_name
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = e.source_relid;
    SELECT a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod) INTO key_name, key_typid, key_typ
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = e.source_relid AND a.attnum = e.key_attnum AND NOT a.attisdropped;
    tgt := format('%I.%I', e.target_schema, e.target_table);

    IF key_name IS NULL OR key_typ <> e.key_type THEN
        -- without its key (or with a key the target cannot compare) nothing can be captured;
        -- migrate reconciles the whole table when it repairs the embedding
        body := 'BEGIN RETURN NULL; END';
    ELSE
        eq := vectorsync._equality(key_typid);
        SELECT coalesce(
                 'NOT pg_catalog.record_image_eq(ROW(' || string_agg(format('o.%I', a.attname), ', ' ORDER BY a.attnum)
                 || '), ROW(' || string_agg(format('n.%I', a.attname), ', ' ORDER BY a.attnum) || '))',
                 'false')
          INTO inputs
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = e.source_relid AND a.attnum = ANY (e.input_attnums) AND NOT a.attisdropped;
        enqueue_update := format(
            'INSERT INTO vectorsync.queue (embedding, key) SELECT %1$L, n.%2$I::pg_catalog.text '
            'FROM vs_new n LEFT JOIN vs_old o ON o.%2$I %3$s n.%2$I WHERE o.%2$I IS NULL OR %4$s',
            e.name, key_name, eq, inputs);
        -- keys rarely change: look for a vanished one in the transition tables before touching the target
        any_vanished := format(
            'SELECT EXISTS (SELECT 1 FROM vs_old o WHERE NOT EXISTS (SELECT 1 FROM vs_new n WHERE n.%1$I %2$s o.%1$I))',
            key_name, eq);
        drop_vanished := format(
            'DELETE FROM %1$s t USING vs_old o WHERE t.%2$I %4$s o.%3$I '
            'AND NOT EXISTS (SELECT 1 FROM vs_new n WHERE n.%3$I %4$s o.%3$I)',
            tgt, e.key_column, key_name, eq);
        drop_deleted := format('DELETE FROM %1$s t USING vs_old o WHERE t.%2$I %4$s o.%3$I',
                               tgt, e.key_column, key_name, eq);
        drop_failed := format(
            'DELETE FROM vectorsync.failed f USING vs_old o WHERE f.embedding OPERATOR(pg_catalog.=) %1$L '
            'AND f.key OPERATOR(pg_catalog.=) o.%2$I::pg_catalog.text',
            e.name, key_name);
        -- Small statements run static SQL, planned once per session for few rows; large ones
        -- EXECUTE the same text so that they are planned for their size (hash joins).
        body := format($body$
DECLARE
    changed bigint;
    queued boolean := false;
    vanished boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO vectorsync.queue (embedding, key) SELECT %1$L, n.%2$I::pg_catalog.text FROM vs_new n;
        queued := FOUND;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT pg_catalog.count(*) INTO changed FROM vs_new;
        IF changed <= 100 THEN
            %3$s;
            queued := FOUND;
            IF (%15$s) THEN
                %4$s;
            END IF;
        ELSE
            EXECUTE %7$L;
            GET DIAGNOSTICS changed = ROW_COUNT;
            queued := changed > 0;
            EXECUTE %16$L INTO vanished;
            IF vanished THEN
                EXECUTE %8$L;
            END IF;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT pg_catalog.count(*) INTO changed FROM vs_old;
        IF changed <= 100 THEN
            %5$s;
        ELSE
            EXECUTE %9$L;
        END IF;
        IF EXISTS (SELECT 1 FROM vectorsync.failed f WHERE f.embedding OPERATOR(pg_catalog.=) %1$L) THEN
            EXECUTE %10$L;
        END IF;
    ELSIF TG_OP = 'TRUNCATE' THEN
        IF TG_RELID OPERATOR(pg_catalog.=) %11$s::pg_catalog.oid THEN
            DELETE FROM %6$s;  -- the target is a view over the generation in service
            DELETE FROM vectorsync.queue q WHERE q.embedding OPERATOR(pg_catalog.=) %1$L;
            DELETE FROM vectorsync.failed f WHERE f.embedding OPERATOR(pg_catalog.=) %1$L;
        ELSE  -- one partition: keep the vectors of the rows still in the other partitions
            DELETE FROM %6$s t WHERE NOT EXISTS (SELECT 1 FROM %12$s s WHERE s.%2$I %13$s t.%14$I);
        END IF;
    END IF;
    IF queued THEN
        PERFORM pg_catalog.pg_notify('vectorsync', %1$L);
    END IF;
    RETURN NULL;
END$body$,
            e.name, key_name, enqueue_update, drop_vanished, drop_deleted, tgt,
            enqueue_update, drop_vanished, drop_deleted, drop_failed,
            e.source_relid, root_name, eq, e.key_column, any_vanished, any_vanished);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'vectorsync_ddl_end')
       AND key_name IS NOT NULL THEN
        -- no event trigger (creating one needs a superuser) follows DDL: a statement that drift
        -- breaks records the embedding as broken instead of failing the user's statement
        body := left(body, -length('END')) || format($guarded$EXCEPTION WHEN syntax_error_or_access_rule_violation THEN
    UPDATE vectorsync.embeddings SET broken = pg_catalog.format(
            'change capture failed: %%s; make the spec match the table and run `vectorsync migrate`', SQLERRM),
        broken_at = pg_catalog.now()
     WHERE name OPERATOR(pg_catalog.=) %1$L AND broken IS NULL;
    RETURN NULL;
END$guarded$, e.name);
    END IF;
    IF body IS DISTINCT FROM (SELECT p.prosrc FROM pg_catalog.pg_proc p
                               WHERE p.pronamespace = 'vectorsync'::pg_catalog.regnamespace
                                 AND p.proname = fn_name AND p.pronargs = 0) THEN
        EXECUTE format(
            'CREATE OR REPLACE FUNCTION vectorsync.%I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
            'SET search_path = pg_catalog, pg_temp SET datestyle = ''ISO, YMD'' SET timezone = ''UTC'' '
            'SET intervalstyle = ''postgres'' SET extra_float_digits = 1 SET bytea_output = ''hex'' AS %L',
            fn_name, body);
        EXECUTE format('REVOKE ALL ON FUNCTION vectorsync.%I() FROM PUBLIC', fn_name);
    END IF;
    fn := format('vectorsync.%I()', fn_name)::regprocedure;

    FOR part IN SELECT t.relid FROM pg_catalog.pg_partition_tree(e.source_relid) t
                UNION SELECT e.source_relid LOOP
        FOR ev IN SELECT * FROM (VALUES
                ('insert', 'AFTER INSERT ON %s REFERENCING NEW TABLE AS vs_new FOR EACH STATEMENT'),
                ('update', 'AFTER UPDATE ON %s REFERENCING OLD TABLE AS vs_old NEW TABLE AS vs_new FOR EACH STATEMENT'),
                ('delete', 'AFTER DELETE ON %s REFERENCING OLD TABLE AS vs_old FOR EACH STATEMENT'),
                ('truncate', 'AFTER TRUNCATE ON %s FOR EACH STATEMENT')) AS v (event, clause) LOOP
            trigger_name := vectorsync._object_name('vectorsync_', e.name, '_' || ev.event);
            SELECT t.oid, t.tgfoid, t.tgnargs INTO existing FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid = part.relid AND t.tgname = trigger_name;
            IF FOUND AND existing.tgfoid = fn AND existing.tgnargs = 0 THEN
                CONTINUE;
            END IF;
            IF FOUND THEN
                EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, part.relid::regclass);
            END IF;
            EXECUTE format('CREATE TRIGGER %I ', trigger_name) || format(ev.clause, part.relid::regclass)
                    || format(' EXECUTE FUNCTION %s()', fn::regproc);
        END LOOP;
    END LOOP;
END""",
)

REGENERATE_CAPTURE = "SELECT vectorsync.install_capture(name) FROM vectorsync.embeddings WHERE source_relid IS NOT NULL"


def upgrade() -> None:
    # execute_script: the bodies hold format() patterns such as %1$I that must reach Postgres as written
    bind = op.get_bind()
    execute_script(bind, GENERATIONS)
    execute_script(bind, ADOPT_TARGETS)
    replace(_embedding, replaces="0008_query_safety._embedding")
    replace(install_capture, replaces="0013_capture_status.install_capture")
    execute_script(bind, REGENERATE_CAPTURE)


def downgrade() -> None:
    bind = op.get_bind()
    replace(_embedding, replace_with="0008_query_safety._embedding")
    execute_script(bind, RESTORE_TARGETS)
    op.execute("DROP TABLE vectorsync.generations")
    replace(install_capture, replace_with="0013_capture_status.install_capture")
    execute_script(bind, REGENERATE_CAPTURE)
