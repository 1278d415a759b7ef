"""Change capture generated per embedding, run as vectorsync's owner, and safe under schema drift.

Replaces the generic ``vectorsync.capture_changes()`` of 0002 (which read the catalogue and
planned dynamic SQL on every statement, and ran as the caller, so an application role without
rights on vectorsync could not write its own table).

- ``vectorsync.install_capture(name)`` generates one trigger function per embedding with static
  SQL: the source's columns are resolved by attribute number when it is generated, every object is
  schema-qualified (operators too), and the function is ``SECURITY DEFINER`` with
  ``search_path = pg_catalog, pg_temp``. It also pins the settings that change how a key is
  written as text (DateStyle, TimeZone, IntervalStyle, extra_float_digits, bytea_output), so a
  queued key reads the same whatever the writing session's settings. Statements of more than 100
  rows run the same SQL through EXECUTE so that they are planned for their size.
- Triggers go on the source table and on each of its partitions (statement triggers on a
  partitioned table do not fire for statements run straight on a partition).
- Event triggers follow DDL: a dropped, renamed or retyped key or input column, or a renamed or
  dropped source table, marks the embedding broken in ``vectorsync.embeddings.broken`` (the
  problem, the DDL that caused it and what to run) and regenerates capture from the columns that
  are still there (by attribute number), or turns it into a no-op when the key is gone, so the
  user's statements keep working. New partitions get capture triggers. ``vectorsync migrate``
  repairs a broken embedding. Creating event triggers needs a superuser; without them the capture
  function catches errors of class 42 (undefined column, ...) and records them in ``broken``.
- The queue loses its (embedding, key) index: it made every enqueued change cost a random btree
  insert, and nothing needs it on the capture path.

Revision ID: 0010_capture_per_embedding
Revises: 0009_missing_row
"""

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0010_capture_per_embedding"
down_revision = "0009_missing_row"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE vectorsync.embeddings
    ADD COLUMN source_relid oid,
    ADD COLUMN key_attnum smallint,
    ADD COLUMN input_attnums smallint[],
    ADD COLUMN broken text,
    ADD COLUMN broken_at timestamptz;
COMMENT ON COLUMN vectorsync.embeddings.broken IS
    'NULL when healthy; otherwise why the source no longer matches the embedding (with the DDL that '
    'changed it) and what to run. Workers skip a broken embedding; vectorsync migrate repairs it.';

UPDATE vectorsync.embeddings e
   SET source_relid = c.oid,
       key_attnum = (SELECT a.attnum FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = e.key_column AND NOT a.attisdropped),
       input_attnums = ARRAY(SELECT a.attnum FROM pg_catalog.unnest(e.input_columns) WITH ORDINALITY AS i (col, pos)
                             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = i.col
                             AND NOT a.attisdropped ORDER BY i.pos)
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = e.source_schema AND c.relname = e.source_table;

DROP INDEX vectorsync.queue_embedding_key;

-- A name for an object of one embedding: readable when it fits in 63 bytes, else cut and made
-- unique with a hash of the whole name (Postgres would cut it silently, and two long names
-- would then share one object).
CREATE FUNCTION vectorsync._object_name(prefix text, embedding text, suffix text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    cut text := embedding;
    tag text := '_' || left(md5(embedding), 8);
BEGIN
    IF octet_length(prefix || embedding || suffix) <= 63 THEN
        RETURN prefix || embedding || suffix;
    END IF;
    WHILE octet_length(prefix || cut || tag || suffix) > 63 LOOP
        cut := left(cut, -1);
    END LOOP;
    RETURN prefix || cut || tag || suffix;
END
$fn$;

-- The equality operator of a type, schema-qualified, so generated SQL resolves nothing through a
-- search path (a domain uses its base type's operator).
CREATE FUNCTION vectorsync._equality(typ oid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    base oid := typ;
    up oid;
    result text;
BEGIN
    LOOP
        SELECT t.typbasetype INTO up FROM pg_catalog.pg_type t WHERE t.oid = base;
        EXIT WHEN up IS NULL OR up = 0;
        base := up;
    END LOOP;
    SELECT format('OPERATOR(%I.=)', n.nspname) INTO result
      FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
     WHERE o.oprname = '=' AND o.oprleft = base AND o.oprright = base
     ORDER BY n.nspname <> 'pg_catalog' LIMIT 1;
    RETURN coalesce(result, 'OPERATOR(pg_catalog.=)');
END
$fn$;

-- What changed in the source since migrate recorded it (NULL when nothing that matters did).
CREATE FUNCTION vectorsync._drift(e vectorsync.embeddings) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    problems text[] := '{}';
    nsp name;
    rel name;
    col record;
BEGIN
    SELECT n.nspname, c.relname INTO nsp, rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = e.source_relid;
    IF NOT FOUND THEN
        RETURN format('source table %I.%I was dropped', e.source_schema, e.source_table);
    END IF;
    IF nsp <> e.source_schema OR rel <> e.source_table THEN
        problems := problems || format('source table %I.%I was renamed to %I.%I',
                                       e.source_schema, e.source_table, nsp, rel);
    END IF;
    SELECT a.attname, a.attisdropped, format_type(a.atttypid, a.atttypmod) AS typ INTO col
      FROM pg_catalog.pg_attribute a WHERE a.attrelid = e.source_relid AND a.attnum = e.key_attnum;
    IF NOT FOUND OR col.attisdropped THEN
        problems := problems || format('key column %I was dropped', e.key_column);
    ELSE
        IF col.attname <> e.key_column THEN
            problems := problems || format('key column %I was renamed to %I', e.key_column, col.attname);
        END IF;
        IF col.typ <> e.key_type THEN
            problems := problems || format('key column %I changed type from %s to %s',
                                           e.key_column, e.key_type, col.typ);
        END IF;
    END IF;
    FOR i IN 1 .. coalesce(array_length(e.input_columns, 1), 0) LOOP
        SELECT a.attname, a.attisdropped INTO col
          FROM pg_catalog.pg_attribute a WHERE a.attrelid = e.source_relid AND a.attnum = e.input_attnums[i];
        IF NOT FOUND OR col.attisdropped THEN
            problems := problems || format('input column %I was dropped', e.input_columns[i]);
        ELSIF col.attname <> e.input_columns[i] THEN
            problems := problems || format('input column %I was renamed to %I', e.input_columns[i], col.attname);
        END IF;
    END LOOP;
    RETURN nullif(array_to_string(problems, '; '), '');
END
$fn$;

-- Generate (or regenerate) the embedding's capture function from the source's current columns,
-- found by the attribute numbers migrate recorded, and put its triggers on the source table and
-- every partition. Unchanged functions and triggers are left alone.
CREATE FUNCTION vectorsync.install_capture(embedding_name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
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
    drop_deleted text;
    drop_failed text;
    body text;
    part record;
    ev record;
    trigger_name text;
    existing record;
BEGIN
    SELECT * INTO e FROM vectorsync.embeddings WHERE name = embedding_name;
    IF NOT FOUND OR e.source_relid IS NULL
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
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO vectorsync.queue (embedding, key) SELECT %1$L, n.%2$I::pg_catalog.text FROM vs_new n;
        queued := FOUND;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT pg_catalog.count(*) INTO changed FROM vs_new;
        IF changed <= 100 THEN
            %3$s;
            queued := FOUND;
            %4$s;
        ELSE
            EXECUTE %7$L;
            GET DIAGNOSTICS changed = ROW_COUNT;
            queued := changed > 0;
            EXECUTE %8$L;
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
            TRUNCATE %6$s;
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
            e.source_relid, root_name, eq, e.key_column);
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
END
$fn$;

-- Remove the embedding's triggers (from the source and its partitions) and capture function.
CREATE FUNCTION vectorsync.drop_capture(embedding_name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    fn regprocedure := pg_catalog.to_regprocedure(
        format('vectorsync.%I()', vectorsync._object_name('capture_', embedding_name, '')));
    t record;
BEGIN
    IF fn IS NULL THEN
        RETURN;
    END IF;
    FOR t IN SELECT tg.tgname, tg.tgrelid FROM pg_catalog.pg_trigger tg WHERE tg.tgfoid = fn LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.tgrelid::regclass);
    END LOOP;
    EXECUTE format('DROP FUNCTION %s', fn);
END
$fn$;

-- After ALTER TABLE / CREATE TABLE: record drift of a source table, regenerate its capture from
-- the columns still there, and put capture triggers on new partitions. Never fails the user's DDL.
CREATE FUNCTION vectorsync._follow_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    e vectorsync.embeddings;
    problem text;
BEGIN
    FOR e IN
        SELECT DISTINCT em.* FROM pg_catalog.pg_event_trigger_ddl_commands() c
          JOIN vectorsync.embeddings em
            ON em.source_relid = c.objid
            OR em.source_relid IN (SELECT a.relid FROM pg_catalog.pg_partition_ancestors(c.objid) a)
         WHERE c.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = c.objid AND r.relkind IN ('r', 'p'))
    LOOP
        BEGIN
            problem := vectorsync._drift(e);
            IF problem IS NOT NULL AND e.broken IS NULL THEN
                UPDATE vectorsync.embeddings
                   SET broken = format('%s by `%s`; make the spec match the table (or undo the change) '
                                       'and run `vectorsync migrate`', problem,
                                       left(pg_catalog.btrim(pg_catalog.current_query()), 300)),
                       broken_at = pg_catalog.now()
                 WHERE name = e.name;
            END IF;
            PERFORM vectorsync.install_capture(e.name);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'vectorsync could not follow this change for embedding %: %', e.name, SQLERRM;
        END;
    END LOOP;
END
$fn$;

-- After DROP: a dropped source table marks its embeddings broken.
CREATE FUNCTION vectorsync._follow_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    UPDATE vectorsync.embeddings em
       SET broken = format('source table %I.%I was dropped by `%s`; restore it, or remove embedding %L from '
                           'the config and run `vectorsync migrate`', em.source_schema, em.source_table,
                           left(pg_catalog.btrim(pg_catalog.current_query()), 300), em.name),
           broken_at = pg_catalog.now()
      FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objsubid = 0
       AND d.objid = em.source_relid AND em.broken IS NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'vectorsync could not record a dropped source table: %', SQLERRM;
END
$fn$;

REVOKE ALL ON FUNCTION vectorsync.install_capture(text), vectorsync.drop_capture(text),
    vectorsync._follow_ddl(), vectorsync._follow_drop(), vectorsync._drift(vectorsync.embeddings)
    FROM PUBLIC;

DO $do$
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER vectorsync_ddl_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
            EXECUTE FUNCTION vectorsync._follow_ddl();
        CREATE EVENT TRIGGER vectorsync_sql_drop ON sql_drop EXECUTE FUNCTION vectorsync._follow_drop();
    ELSE
        RAISE WARNING 'vectorsync: not a superuser, so no event trigger follows schema changes of source tables; '
                      'change capture records drift when it meets it instead';
    END IF;
END
$do$;
"""

DOWNGRADE = r"""
DROP EVENT TRIGGER IF EXISTS vectorsync_ddl_end;
DROP EVENT TRIGGER IF EXISTS vectorsync_sql_drop;
DROP FUNCTION vectorsync._follow_ddl();
DROP FUNCTION vectorsync._follow_drop();
DROP FUNCTION vectorsync.install_capture(text);
DROP FUNCTION vectorsync.drop_capture(text);
DROP FUNCTION vectorsync._drift(vectorsync.embeddings);
DROP FUNCTION vectorsync._equality(oid);
DROP FUNCTION vectorsync._object_name(text, text, text);
CREATE INDEX queue_embedding_key ON vectorsync.queue (embedding, key);
ALTER TABLE vectorsync.embeddings DROP COLUMN source_relid, DROP COLUMN key_attnum, DROP COLUMN input_attnums,
    DROP COLUMN broken, DROP COLUMN broken_at;
"""


def upgrade() -> None:
    bind = op.get_bind()
    execute_script(bind, UPGRADE)
    # 0002's generic function goes with its triggers; each embedding gets its own in the same
    # transaction, so no change goes uncaptured in between
    execute_script(bind, "DROP FUNCTION vectorsync.capture_changes() CASCADE")
    execute_script(
        bind, "SELECT vectorsync.install_capture(name) FROM vectorsync.embeddings WHERE source_relid IS NOT NULL"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.exec_driver_sql("SELECT count(*) FROM vectorsync.embeddings").scalar():
        raise RuntimeError(
            "downgrading below 0010 would leave embeddings without change capture; "
            "run `vectorsync migrate --downgrade` (drops every embedding) instead"
        )
    execute_script(bind, DOWNGRADE)
    # back to 0002's generic function, as that revision created it
    op.get_context().script.get_revision("0002_change_capture").module.upgrade()  # type: ignore[union-attr]  # set by env.py's run
