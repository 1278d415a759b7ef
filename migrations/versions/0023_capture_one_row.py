"""A one-row UPDATE is captured without a join, and ``vectorsync.changes`` is a bare heap.

Profiled per single-row UPDATE (server instructions under callgrind, PostgreSQL 18; a plain
single-row UPDATE is ~63k): the statement trigger with its transition tables costs ~8k, each SPI
statement over a transition table 15-35k, and the capture's one statement ~120k, of which the
hash full join of old and new rows (executor start-up of Hash, Agg and the row comparison) is
~70k and the ``changes`` row's identity value and primary-key entry ~15k. A row-level trigger is
cheaper for one row (~26k) but costs 2.1-2.8x on a 10,000-row UPDATE, and a transaction-local
buffer flushed at commit costs more than it saves (``set_config`` per statement ~30k).

So:

- The capture first takes the statement's first keys into an array (``ARRAY(... LIMIT 3)`` over
  the two transition tables) and branches on how many it holds. An UPDATE that matched no row (a
  missed optimistic lock, an upsert's probe) returns at once.
- An UPDATE of one row writes its key (and its old key when the key changed) from that array,
  without comparing its input values: the
  worker already drops a row whose input hash and model version match its stored vector before
  encoding (``worker._without_unchanged``), so an update of a non-input column costs the worker a
  read, never an encode. Embeddings whose input is a file reference (``path_column``), whose rows
  the worker always re-reads, keep the comparison for one row too.
- An UPDATE of more rows compares input values in the one full join, as before: a bulk update of
  non-input columns queues nothing.
- ``vectorsync.changes`` loses its identity column and primary key: workers spread rows by
  ``ctid`` (``FOR UPDATE SKIP LOCKED``, at most ``SPREAD_ROWS`` a lease), and the queue keeps
  capture order by ``enqueued_at``. It stays WAL-logged, so a committed capture survives a crash.

Revision ID: 0023_capture_one_row
Revises: 0022_model_input_attnums
"""

from alembic import op

from vectorsync.migrations.operations import execute_script
from vectorsync.migrations.replaceable import Function, replace

revision = "0023_capture_one_row"
down_revision = "0022_model_input_attnums"
branch_labels = None
depends_on = None

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
    one_row text := '';
    one_row_end text := '';
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
        -- A one-row UPDATE skips the join (most of the capture's cost): its key, and its old key
        -- if that changed. The worker drops the row if its input hash is unchanged; it cannot
        -- for a file reference, which it always reads again, so those keep the comparison.
        IF e.spec ->> 'path_column' IS NULL THEN
            one_row := format($one$
        captured := ARRAY(SELECT n.%1$I::pg_catalog.text FROM vs_new n
                          UNION ALL SELECT o.%1$I::pg_catalog.text FROM vs_old o LIMIT 3);
        IF pg_catalog.cardinality(captured) OPERATOR(pg_catalog.<) 2 THEN  -- no row
            RETURN NULL;
        ELSIF pg_catalog.cardinality(captured) OPERATOR(pg_catalog.=) 2 THEN  -- one row: new key, old key
            INSERT INTO vectorsync.changes (embedding, keys) VALUES (%2$L,
                CASE WHEN captured[1] OPERATOR(pg_catalog.=) captured[2] THEN captured[1:1] ELSE captured END);
        ELSE$one$, key_name, e.name);
            one_row_end := E'\n        END IF;';
        END IF;
        -- Static SQL only: each statement's plan is made once per session. The full join can only
        -- be a hash or merge join, right for one row as for a million.
        body := format($body$
-- settings pinned:%9$s
DECLARE
    notified text;
    captured pg_catalog.text[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO vectorsync.changes (embedding, keys)
        SELECT %1$L, a.keys FROM (SELECT ARRAY(SELECT n.%2$I::pg_catalog.text FROM vs_new n)) AS a (keys)
         WHERE pg_catalog.cardinality(a.keys) OPERATOR(pg_catalog.>) 0;
    ELSIF TG_OP = 'UPDATE' THEN%10$s
        -- new keys, vanished keys (the worker deletes their vectors) and rows whose inputs changed
        INSERT INTO vectorsync.changes (embedding, keys)
        SELECT %1$L, pg_catalog.array_agg(coalesce(n.%2$I, o.%2$I)::pg_catalog.text)
          FROM vs_new n FULL JOIN vs_old o ON o.%2$I %3$s n.%2$I
         WHERE o.%2$I IS NULL OR n.%2$I IS NULL OR %4$s
        HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0;%11$s
    ELSIF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM vs_old o OFFSET 1000) THEN
            -- a large delete costs the application no more than this look: the worker finds
            -- the keys whose rows are gone (NULL keys) and deletes their vectors
            INSERT INTO vectorsync.changes (embedding, keys) VALUES (%1$L, NULL);
        ELSE  -- a small one removes its vectors at once
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
            CASE WHEN settings = '' THEN ' none' ELSE ' key text form' END, one_row, one_row_end);
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

# Workers spread ``changes`` rows by ctid; a downgrade numbers the rows left (in physical order,
# which is capture order but for reused space) for the revisions that spread by id.
BARE_CHANGES = "ALTER TABLE vectorsync.changes DROP COLUMN id"
NUMBERED_CHANGES = "ALTER TABLE vectorsync.changes ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY"


def upgrade() -> None:
    bind = op.get_bind()
    replace(install_capture, replaces="0021_large_delete_marker.install_capture")
    execute_script(bind, REGENERATE_CAPTURE)
    execute_script(bind, BARE_CHANGES)


def downgrade() -> None:
    bind = op.get_bind()
    execute_script(bind, NUMBERED_CHANGES)
    replace(install_capture, replace_with="0021_large_delete_marker.install_capture")
    execute_script(bind, REGENERATE_CAPTURE)
