"""Capture v2 and status: ``vectorsync.status`` shows why an embedding is broken; capture skips graphs
and costs less on bulk updates.

- ``vectorsync.embedding_status`` / ``vectorsync.status`` gain ``broken``: NULL when healthy, else
  what changed in the source, the DDL that changed it, and what to run.
- ``vectorsync.install_capture`` no longer installs row capture for graph embeddings (their
  own capture is revision 0011's), and the generated UPDATE trigger looks for a changed key in the
  transition tables before it touches the target table: a bulk UPDATE that changes no key no
  longer scans the target.

Revision ID: 0013_capture_status
Revises: 0012_queue_leases
"""

from alembic import op

from vectorsync.migrations.operations import execute_script
from vectorsync.migrations.replaceable import Function, View, create, drop, replace

revision = "0013_capture_status"
down_revision = "0012_queue_leases"
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

# One row per embedding (or only `embedding_name`): how far its vectors are from its source rows.
# lag_seconds is the age of the oldest queued change (0 when nothing is pending). A caller that
# may not read an embedding's source table gets a permission error, as from the query functions.
embedding_status = Function(
    "vectorsync.embedding_status",
    "embedding_name text DEFAULT NULL",
    (
        "TABLE (name text, source_rows bigint, embedded bigint, embedded_current_model bigint, pending bigint, "
        "failed bigint, model_version integer, lag_seconds double precision, last_embedded timestamptz, "
        "last_sync timestamptz, broken text)"
    ),
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    e vectorsync.embeddings;
    source regclass;
    target regclass;
BEGIN
    FOR e IN SELECT * FROM vectorsync.embeddings
             WHERE embedding_name IS NULL OR vectorsync.embeddings.name = embedding_name
             ORDER BY vectorsync.embeddings.name LOOP
        name := e.name;
        model_version := e.current_version;
        last_sync := e.last_sync;
        broken := e.broken;
        source_rows := NULL;
        source := to_regclass(format('%I.%I', e.source_schema, e.source_table));
        IF source IS NOT NULL THEN
            IF NOT has_table_privilege(source, 'SELECT') THEN
                RAISE EXCEPTION 'vectorsync: permission denied for table %, the source of embedding %', source, e.name
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'a role that may SELECT from the source table may see its status';
            END IF;
            EXECUTE format('SELECT count(*) FROM %s', source) INTO source_rows;
        END IF;
        embedded := 0;
        embedded_current_model := 0;
        last_embedded := NULL;
        target := vectorsync._target(e, missing_ok => true);
        IF target IS NOT NULL THEN
            EXECUTE format('SELECT count(*), count(*) FILTER (WHERE model_version = $1), max(embedded_at) FROM %s',
                           target)
                INTO embedded, embedded_current_model, last_embedded USING e.current_version;
        END IF;
        SELECT b.pending, b.lag_seconds, b.failed INTO pending, lag_seconds, failed
          FROM vectorsync._backlog(e.name) b;
        RETURN NEXT;
    END LOOP;
END
""",
)

status = View("vectorsync.status", "SELECT * FROM vectorsync.embedding_status()")

REGENERATE = """
SELECT vectorsync.drop_capture(name) FROM vectorsync.embeddings WHERE modality = 'graph';
SELECT vectorsync.install_capture(name) FROM vectorsync.embeddings WHERE source_relid IS NOT NULL;
"""


def _installed_by_0010() -> str:
    """0010's install_capture, as that revision created it."""
    script: str = op.get_context().script.get_revision("0010_capture_per_embedding").module.UPGRADE  # type: ignore[union-attr]  # set by env.py's run
    start = script.index("CREATE FUNCTION vectorsync.install_capture(")
    end = script.index("\n$fn$;", start) + len("\n$fn$;")
    return "CREATE OR REPLACE" + script[start + len("CREATE") : end]


def _recreate_status(*, upgrade: bool) -> None:
    """Replace embedding_status (its result type changes, so the view goes and comes back) and keep
    the SELECT grants ``vectorsync grant reader`` gave on the view."""
    bind = op.get_bind()
    readers = [
        row[0]
        for row in bind.exec_driver_sql(
            "SELECT grantee FROM information_schema.role_table_grants "
            "WHERE table_schema = 'vectorsync' AND table_name = 'status' AND privilege_type = 'SELECT' "
            "AND grantee <> current_user"
        ).fetchall()
    ]
    drop(status)
    if upgrade:
        replace(embedding_status, replaces="0008_query_safety.embedding_status")
    else:
        replace(embedding_status, replace_with="0008_query_safety.embedding_status")
    create(status)
    for reader in readers:
        grant = bind.exec_driver_sql("SELECT format('GRANT SELECT ON vectorsync.status TO %%I', %s)", (reader,))
        execute_script(bind, str(grant.scalar()))


def upgrade() -> None:
    execute_script(op.get_bind(), install_capture.create(or_replace=True))
    _recreate_status(upgrade=True)
    execute_script(op.get_bind(), REGENERATE)


def downgrade() -> None:
    execute_script(op.get_bind(), _installed_by_0010())
    _recreate_status(upgrade=False)
    execute_script(op.get_bind(), REGENERATE)
