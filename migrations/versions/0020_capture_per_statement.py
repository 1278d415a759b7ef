"""Change capture writes one row per statement: ``vectorsync.changes`` holds the statement's keys as
an array, and workers spread them into ``vectorsync.queue`` (one row per key) when they lease.

A queue row per changed key cost the application about as much as its own row (a heap tuple, two
btree entries, a sequence value), and a DELETE removed as many target rows as it deleted. Now:

- INSERT: one ``changes`` row with every inserted key.
- UPDATE: one pass (a full join of the transition tables on the key) finds new keys, vanished keys
  and rows whose input columns changed (``record_image_eq``); one ``changes`` row holds them all,
  none when no input changed. The target is never touched: a vanished key's vector is deleted by
  the worker, which finds its source row gone.
- DELETE: a statement of up to 1,000 rows deletes their vectors at once (index lookups, as
  before); a larger one queues its keys in one ``changes`` row and the worker deletes the vectors
  (and the keys' failed items). Until then ``nearest()`` may return a key whose row is gone, as it
  returns an updated row's old vector until the worker has run.
- No per-row statement and no dynamic SQL: the capture function is static SQL only. Settings that
  change a key's text form (DateStyle, TimeZone, ...) are pinned only for key types whose text
  depends on them; integer, numeric, text and uuid keys skip setting them on every statement.

``vectorsync.pending`` shows every captured key, spread or not (``status`` counts it; tests read
it). Spreading happens in the worker's lease transaction, so a change is moved exactly once; a
killed worker's spread rolls back with its transaction.

Revision ID: 0020_capture_per_statement
Revises: 0019_hybrid_search
"""

from alembic import op

from vectorsync.migrations.operations import execute_script
from vectorsync.migrations.replaceable import Function, View, create, drop, replace

revision = "0020_capture_per_statement"
down_revision = "0019_hybrid_search"
branch_labels = None
depends_on = None

CHANGES = """
CREATE TABLE vectorsync.changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    embedding   text NOT NULL,
    keys        text[] NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- rows live seconds: compressing a statement's keys cost more than storing them
ALTER TABLE vectorsync.changes ALTER COLUMN keys SET STORAGE EXTERNAL;
COMMENT ON TABLE vectorsync.changes IS
    'Keys captured by one statement, not yet spread into vectorsync.queue (workers do it when they lease).';
"""

pending = View(
    "vectorsync.pending",
    "SELECT q.embedding, q.key, q.enqueued_at FROM vectorsync.queue q "
    "UNION ALL SELECT c.embedding, k.key, c.enqueued_at FROM vectorsync.changes c, unnest(c.keys) AS k (key)",
)

# Queued and failed counts of an embedding, captured keys not yet spread included.
_backlog = Function(
    "vectorsync._backlog",
    "embedding_name text",
    "TABLE (pending bigint, lag_seconds double precision, failed bigint)",
    "LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp",
    r"""
    SELECT (SELECT count(DISTINCT p.key) FROM vectorsync.pending p WHERE p.embedding = embedding_name),
           (SELECT coalesce(extract(epoch FROM now() - min(p.enqueued_at))::float8, 0)
              FROM vectorsync.pending p WHERE p.embedding = embedding_name),
           (SELECT count(*) FROM vectorsync.failed f WHERE f.embedding = embedding_name)
""",
)

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
    key_base oid;
    key_typ text;
    eq text;
    inputs text;
    tgt text;
    settings text := '';
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
        key_base := key_typid;
        WHILE (SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = key_base) <> 0 LOOP
            key_base := (SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = key_base);
        END LOOP;
        -- these types' text form depends on no setting; any other key's does (dates, times,
        -- floats, bytea, money, arrays, ...), so the settings that shape it are pinned
        IF key_base NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype,
                            'text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'uuid'::regtype,
                            'bool'::regtype, 'name'::regtype, 'oid'::regtype) THEN
            settings := ' SET datestyle = ''ISO, YMD'' SET timezone = ''UTC'' SET intervalstyle = ''postgres'' '
                        'SET extra_float_digits = 1 SET bytea_output = ''hex''';
        END IF;
        SELECT coalesce(
                 'NOT pg_catalog.record_image_eq(ROW(' || string_agg(format('o.%I', a.attname), ', ' ORDER BY a.attnum)
                 || '), ROW(' || string_agg(format('n.%I', a.attname), ', ' ORDER BY a.attnum) || '))',
                 'false')
          INTO inputs
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = e.source_relid AND a.attnum = ANY (e.input_attnums) AND NOT a.attisdropped;
        -- Static SQL only: each statement's plan is made once per session. The full join can only
        -- be a hash or merge join, right for one row as for a million.
        body := format($body$
-- settings pinned:%9$s
DECLARE
    notified text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO vectorsync.changes (embedding, keys)
        SELECT %1$L, a.keys FROM (SELECT pg_catalog.array_agg(n.%2$I::pg_catalog.text) FROM vs_new n) AS a (keys)
         WHERE a.keys IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        -- new keys, vanished keys (the worker deletes their vectors) and rows whose inputs changed
        INSERT INTO vectorsync.changes (embedding, keys)
        SELECT %1$L, a.keys
          FROM (SELECT pg_catalog.array_agg(coalesce(n.%2$I, o.%2$I)::pg_catalog.text)
                  FROM vs_new n FULL JOIN vs_old o ON o.%2$I %3$s n.%2$I
                 WHERE o.%2$I IS NULL OR n.%2$I IS NULL OR %4$s) AS a (keys)
         WHERE a.keys IS NOT NULL;
    ELSIF TG_OP = 'DELETE' THEN
        -- a large delete leaves the vectors to the worker; a small one removes them now
        INSERT INTO vectorsync.changes (embedding, keys)
        SELECT %1$L, pg_catalog.array_agg(o.%2$I::pg_catalog.text) FROM vs_old o
        HAVING pg_catalog.count(*) > 1000;
        IF NOT FOUND THEN
            DELETE FROM %5$s t USING vs_old o WHERE t.%6$I %3$s o.%2$I;
            IF EXISTS (SELECT 1 FROM vectorsync.failed f WHERE f.embedding OPERATOR(pg_catalog.=) %1$L) THEN
                DELETE FROM vectorsync.failed f USING vs_old o WHERE f.embedding OPERATOR(pg_catalog.=) %1$L
                   AND f.key OPERATOR(pg_catalog.=) o.%2$I::pg_catalog.text;
            END IF;
            RETURN NULL;
        END IF;
    ELSIF TG_OP = 'TRUNCATE' THEN
        IF TG_RELID OPERATOR(pg_catalog.=) %7$s::pg_catalog.oid THEN
            DELETE FROM %5$s;  -- the target is a view over the generation in service
            DELETE FROM vectorsync.queue q WHERE q.embedding OPERATOR(pg_catalog.=) %1$L;
            DELETE FROM vectorsync.changes c WHERE c.embedding OPERATOR(pg_catalog.=) %1$L;
            DELETE FROM vectorsync.failed f WHERE f.embedding OPERATOR(pg_catalog.=) %1$L;
        ELSE  -- one partition: keep the vectors of the rows still in the other partitions
            DELETE FROM %5$s t WHERE NOT EXISTS (SELECT 1 FROM %8$s s WHERE s.%2$I %3$s t.%6$I);
        END IF;
        RETURN NULL;
    END IF;
    IF FOUND THEN  -- an assignment is evaluated without the executor PERFORM starts
        notified := pg_catalog.pg_notify('vectorsync', %1$L)::pg_catalog.text;
    END IF;
    RETURN NULL;
END$body$,
            e.name, key_name, eq, inputs, tgt, e.key_column, e.source_relid, root_name,
            CASE WHEN settings = '' THEN ' none' ELSE ' key text form' END);
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
            'SET search_path = pg_catalog, pg_temp%s AS %L',
            fn_name, settings, body);
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

# Keys captured but not spread go back to the queue, one row per key, before the table goes.
SPREAD_ALL = """
INSERT INTO vectorsync.queue (embedding, key, enqueued_at)
SELECT c.embedding, k.key, c.enqueued_at FROM vectorsync.changes c, unnest(c.keys) WITH ORDINALITY AS k (key, n)
ORDER BY c.id, k.n
"""


def upgrade() -> None:
    bind = op.get_bind()
    execute_script(bind, CHANGES)
    create(pending)
    replace(_backlog, replaces="0008_query_safety._backlog")
    replace(install_capture, replaces="0015_generations.install_capture")
    execute_script(bind, REGENERATE_CAPTURE)


def downgrade() -> None:
    bind = op.get_bind()
    replace(install_capture, replace_with="0015_generations.install_capture")
    execute_script(bind, REGENERATE_CAPTURE)
    execute_script(bind, SPREAD_ALL)
    replace(_backlog, replace_with="0008_query_safety._backlog")
    drop(pending)
    execute_script(bind, "DROP TABLE vectorsync.changes")
