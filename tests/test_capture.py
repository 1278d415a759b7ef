"""Change capture: it runs as vectorsync's owner, cannot be hijacked through a caller's search path,
survives schema drift without failing the user's statements, writes keys in one text form whatever
the session's settings, and follows partitions."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.worker_support import vectorsync
from vectorsync.sync.db import session_options

SPEC = """
[[embeddings]]
name = "{name}"
table = "{table}"
key = "{key}"
modality = "tabular"
dim = 4
index = "none"
columns = [{columns}]
encoder = {{ type = "autoencoder", seed = 1, epochs = 1, hidden = [8] }}
"""


def spec(path: Path, *, name: str = "items", table: str = "items", key: str = "id", columns=("a", "b")) -> Path:
    path.write_text(
        textwrap.dedent(SPEC.format(name=name, table=table, key=key, columns=", ".join(f'"{c}"' for c in columns)))
    )
    return path


def as_role(url: str, role: str, **settings: str) -> psycopg.Connection:
    info = conninfo_to_dict(url)
    info["user"] = role
    if settings:
        info["options"] = " ".join(f"-c {k}={v}" for k, v in settings.items())
    return psycopg.connect(make_conninfo(**info), autocommit=True)


@pytest.fixture
def make_role(conn: psycopg.Connection, db_url: str) -> Iterator:
    """Create login roles for one test (roles belong to the whole server: unique names, dropped after)."""
    made: list[str] = []

    def make(prefix: str) -> str:
        role = f"{prefix}_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(conninfo_to_dict(db_url)["dbname"]), sql.Identifier(role)))
        made.append(role)
        return role

    yield make
    for role in made:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
            sql.Identifier(conninfo_to_dict(db_url)["dbname"]), sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def create_items(conn: psycopg.Connection, rows: int = 40, key_type: str = "integer") -> None:
    conn.execute(f"CREATE TABLE items (id {key_type} PRIMARY KEY, a double precision, b double precision, note text)")
    conn.execute(
        "INSERT INTO items (id, a, b) SELECT g, g %% 7, cos(g) FROM generate_series(1, %s) g", (rows,)
    )


@pytest.fixture
def items(conn: psycopg.Connection, db_url: str, tmp_path: Path) -> Path:
    """``items`` (integer key) migrated, trained and synced."""
    create_items(conn)
    config = spec(tmp_path / "vectorsync.toml")
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "sync")
    return config


def vectors_match_source(conn: psycopg.Connection) -> bool:
    return conn.execute(
        "SELECT (SELECT array_agg(id ORDER BY id) FROM items) IS NOT DISTINCT FROM "
        "(SELECT array_agg(id ORDER BY id) FROM items_embeddings)"
    ).fetchone()[0]


def broken(conn: psycopg.Connection, name: str = "items") -> str | None:
    return conn.execute("SELECT broken FROM vectorsync.embeddings WHERE name = %s", (name,)).fetchone()[0]


# --- roles -------------------------------------------------------------------------------------


def test_an_application_role_with_table_rights_only_writes_and_vectors_follow(conn, db_url, items, make_role):
    app = make_role("app")
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items TO {}").format(sql.Identifier(app)))
    with as_role(db_url, app) as writer:
        writer.execute("INSERT INTO items (id, a, b) VALUES (1000, 1, 2)")
        writer.execute("UPDATE items SET a = a + 1 WHERE id <= 5")
        writer.execute("DELETE FROM items WHERE id = 7")
    assert conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0] == 6
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id = 7").fetchone()[0] == 0
    vectorsync(db_url, items, "sync")
    assert vectors_match_source(conn)
    with as_role(db_url, app) as writer:
        writer.execute("TRUNCATE items")
    assert conn.execute("SELECT count(*) FROM items_embeddings").fetchone()[0] == 0


def test_a_callers_search_path_cannot_make_the_trigger_run_its_objects(conn, db_url, items, make_role):
    evil = make_role("evil")
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {}").format(sql.Identifier(evil)))
    conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
        sql.Identifier(conninfo_to_dict(db_url)["dbname"]), sql.Identifier(evil)))
    with as_role(db_url, evil) as attacker:
        attacker.execute("CREATE SCHEMA evil")
        attacker.execute("CREATE TABLE evil.calls (what text)")
        attacker.execute("CREATE TABLE evil.queue (embedding text, key text)")
        attacker.execute("CREATE TABLE evil.failed (embedding text, key text)")
        for signature, returns, value in (
            ("pg_notify(text, text)", "void", ""),
            ("count(double precision)", "bigint", "0"),
            ("record_image_eq(record, record)", "boolean", "true"),
            ("text(integer)", "text", "'0'"),
            ("int4eq(integer, integer)", "boolean", "true"),
        ):
            name = signature.split("(")[0]
            attacker.execute(
                f"CREATE FUNCTION evil.{signature} RETURNS {returns} LANGUAGE plpgsql AS "
                # only calls made from inside a trigger count: the attacker's own statement uses them too
                f"$$ BEGIN IF pg_catalog.pg_trigger_depth() > 0 THEN INSERT INTO evil.calls VALUES ('{name}'); "
                f"END IF; RETURN {value}; END $$"
            )
        attacker.execute(
            "CREATE OPERATOR evil.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.int4eq)"
        )
        attacker.execute("SET search_path = evil, pg_catalog, public")
        # the attacker's own statements name pg_catalog's operators, so only the trigger could meet evil's
        attacker.execute(
            "UPDATE public.items SET a = a OPERATOR(pg_catalog.+) 10 WHERE id OPERATOR(pg_catalog.=) ANY ('{1,2}')"
        )
        attacker.execute("UPDATE public.items SET a = a OPERATOR(pg_catalog.+) 10 WHERE id OPERATOR(pg_catalog.=) 4")
        attacker.execute("DELETE FROM public.items WHERE id OPERATOR(pg_catalog.=) 3")
        assert attacker.execute("SELECT count(*) FROM evil.calls").fetchone()[0] == 0
        assert attacker.execute("SELECT count(*) FROM evil.queue").fetchone()[0] == 0
    assert sorted(r[0] for r in conn.execute("SELECT key FROM vectorsync.pending")) == ["1", "2", "4"]
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id = 3").fetchone()[0] == 0


def test_capture_functions_are_security_definer_with_a_pinned_search_path(conn, items):
    rows = conn.execute(
        "SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p JOIN pg_trigger t ON t.tgfoid = p.oid "
        "WHERE t.tgrelid = 'items'::regclass"
    ).fetchall()
    assert rows and all(secdef for _, secdef, _ in rows)
    assert all("search_path=pg_catalog, pg_temp" in config for _, _, config in rows)


# --- schema drift ------------------------------------------------------------------------------


def user_statements_succeed(conn: psycopg.Connection, key_expr: str = "1000") -> None:
    conn.execute(f"INSERT INTO items (id, a) VALUES ({key_expr}, 1)")
    conn.execute("UPDATE items SET note = 'x', a = 3 WHERE id IN (SELECT id FROM items ORDER BY id LIMIT 3)")
    conn.execute("UPDATE items SET a = a + 1")  # a bulk statement takes the EXECUTE path
    conn.execute("DELETE FROM items WHERE id IN (SELECT id FROM items ORDER BY id LIMIT 2)")


def test_dropping_an_input_column_keeps_writes_working_and_migrate_repairs(conn, db_url, items, tmp_path, cli):
    conn.execute("ALTER TABLE items DROP COLUMN b")
    user_statements_succeed(conn)
    reason = broken(conn)
    assert "input column b was dropped by `ALTER TABLE items DROP COLUMN b`" in reason
    assert "vectorsync migrate" in reason
    assert conn.execute("SELECT broken FROM vectorsync.status WHERE name = 'items'").fetchone()[0] == reason
    spec(items, columns=("a",))
    vectorsync(db_url, items, "migrate")
    assert broken(conn) is None
    # the model in service reads b: one line saying to retrain, not every row failed for it
    refused = cli("sync", config=items)
    assert refused.code == 1 and "trained on column 'b'" in refused.err and "vectorsync train items" in refused.err
    assert conn.execute("SELECT count(*) FROM vectorsync.failed").fetchone()[0] == 0
    vectorsync(db_url, items, "train", "items")
    vectorsync(db_url, items, "sync")
    assert vectors_match_source(conn)
    conn.execute("UPDATE items SET a = a + 1 WHERE id = 10")
    assert conn.execute("SELECT key FROM vectorsync.pending").fetchall() == [("10",)]


def test_renaming_an_input_column_keeps_capture_by_attribute_number(conn, db_url, items):
    conn.execute("ALTER TABLE items RENAME COLUMN b TO bee")
    user_statements_succeed(conn)
    assert "input column b was renamed to bee" in broken(conn)
    conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
    conn.execute("UPDATE items SET bee = bee + 1 WHERE id IN (20, 22)")
    conn.execute("UPDATE items SET note = 'unrelated' WHERE id IN (21, 23)")
    assert sorted(conn.execute("SELECT key FROM vectorsync.pending").fetchall()) == [("20",), ("22",)]
    spec(items, columns=("a", "bee"))
    vectorsync(db_url, items, "migrate")
    assert broken(conn) is None
    vectorsync(db_url, items, "train", "items")
    vectorsync(db_url, items, "sync")
    assert vectors_match_source(conn)


@pytest.mark.parametrize("new_type", ["bigint", "text"])
def test_changing_the_key_type_keeps_writes_working_and_migrate_repairs(conn, db_url, items, new_type):
    conn.execute(f"ALTER TABLE items ALTER COLUMN id TYPE {new_type}")
    user_statements_succeed(conn, "'1000'" if new_type == "text" else "1000")
    assert f"key column id changed type from integer to {new_type}" in broken(conn)
    vectorsync(db_url, items, "migrate")
    assert broken(conn) is None
    vectorsync(db_url, items, "sync")
    assert conn.execute(
        "SELECT (SELECT array_agg(id::text ORDER BY id::text) FROM items) = "
        "(SELECT array_agg(id::text ORDER BY id::text) FROM items_embeddings)"
    ).fetchone()[0]


def test_renaming_the_source_table_is_reported_and_capture_goes_on(conn, db_url, items):
    conn.execute("ALTER TABLE items RENAME TO goods")
    conn.execute("INSERT INTO goods (id, a) VALUES (1000, 1)")
    conn.execute("UPDATE goods SET a = a + 1 WHERE id = 3")
    conn.execute("DELETE FROM goods WHERE id = 4")
    assert "source table public.items was renamed to public.goods" in broken(conn)
    assert sorted(r[0] for r in conn.execute("SELECT key FROM vectorsync.pending")) == ["1000", "3"]
    spec(items, table="goods")
    vectorsync(db_url, items, "migrate")
    assert broken(conn) is None
    vectorsync(db_url, items, "sync")
    assert conn.execute(
        "SELECT (SELECT array_agg(id ORDER BY id) FROM goods) = "
        "(SELECT array_agg(id ORDER BY id) FROM items_embeddings)"
    ).fetchone()[0]


def test_dropping_the_source_table_is_reported(conn, items):
    conn.execute("DROP TABLE items")
    assert "source table public.items was dropped by `DROP TABLE items`" in broken(conn)


def test_without_event_triggers_drift_is_recorded_instead_of_failing_the_statement(conn, items):
    conn.execute("DROP EVENT TRIGGER vectorsync_ddl_end")
    conn.execute("SELECT vectorsync.install_capture('items')")
    conn.execute("ALTER TABLE items DROP COLUMN b")
    user_statements_succeed(conn)
    assert "change capture failed" in broken(conn) and "vectorsync migrate" in broken(conn)


# --- keys --------------------------------------------------------------------------------------

KEYS = {
    "date": "DATE '2024-03-04' + g",
    "timestamp": "TIMESTAMP '2024-03-04 05:06:07.25' + g * INTERVAL '1 day 1 hour'",
    "timestamptz": "TIMESTAMPTZ '2024-03-04 05:06:07.25+00' + g * INTERVAL '1 day 1 hour'",
    "numeric": "g / 3.0",
    "double precision": "g / 3.0::float8",
    "uuid": "md5(g::text)::uuid",
    "text": "'k,' || g || ' ü'",
    "interval": "g * INTERVAL '1 day 2 hours'",
}


@pytest.mark.parametrize("key_type", list(KEYS))
def test_keys_written_under_other_session_settings_embed_the_right_row(conn, db_url, tmp_path, key_type):
    conn.execute(f"CREATE TABLE items (id {key_type} PRIMARY KEY, a double precision, b double precision)")
    conn.execute(f"INSERT INTO items SELECT {KEYS[key_type]}, g % 7, cos(g) FROM generate_series(1, 40) g")
    config = spec(tmp_path / "vectorsync.toml")
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "sync")
    canonical = psycopg.connect(db_url, autocommit=True, options=session_options(db_url))
    snapshot = "SELECT id::text, embedded_at FROM items_embeddings"
    before = dict(canonical.execute(snapshot).fetchall())
    with as_role(
        db_url, conninfo_to_dict(db_url).get("user") or "postgres",
        DateStyle="SQL,DMY", TimeZone="Asia/Kolkata", IntervalStyle="sql_standard", extra_float_digits="0",
    ) as writer:
        writer.execute("UPDATE items SET a = a + 100 WHERE id = (SELECT id FROM items ORDER BY id OFFSET 12 LIMIT 1)")
    (expected,) = canonical.execute("SELECT id::text FROM items ORDER BY items.id OFFSET 12 LIMIT 1").fetchone()
    assert conn.execute("SELECT key FROM vectorsync.pending").fetchall() == [(expected,)]
    vectorsync(db_url, config, "sync")
    after = dict(canonical.execute(snapshot).fetchall())
    canonical.close()
    assert after.keys() == before.keys()
    assert [k for k in after if after[k] != before[k]] == [expected]
    assert conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0] == 0


def test_migrate_requires_a_unique_not_null_key(conn, db_url, tmp_path, cli):
    conn.execute("CREATE TABLE items (id integer, a double precision, b double precision)")
    config = spec(tmp_path / "vectorsync.toml")
    result = cli("migrate", config=config)
    assert result.code == 1
    assert "column 'id' of table 'items' is neither the primary key nor a NOT NULL column with a unique index" in (
        result.err.replace("\n", " ")
    )
    conn.execute("CREATE UNIQUE INDEX ON items (id)")
    assert cli("migrate", config=config).code == 1  # unique, but NULL keys would still be allowed
    conn.execute("ALTER TABLE items ALTER COLUMN id SET NOT NULL")
    assert cli("migrate", config=config).code == 0


def test_names_vectorsync_uses_itself_are_refused_with_the_column_named(conn, tmp_path, cli):
    conn.execute('CREATE TABLE items (embedding integer PRIMARY KEY, "__key__" double precision, b real)')
    result = cli("migrate", config=spec(tmp_path / "vectorsync.toml", key="embedding", columns=("__key__", "b")))
    assert result.code == 1
    message = result.err.replace("\n", " ")
    assert "column '__key__' has a name vectorsync uses internally" in message
    assert "key column 'embedding' has the name of a column of the target table" in message


def test_long_embedding_names_get_distinct_index_and_trigger_names(conn, db_url, tmp_path):
    long = "a_long_embedding_name_of_forty_chars_"  # + "one"/"two": 40, the longest a name may be
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, a double precision, b double precision)")
    conn.execute("INSERT INTO items SELECT g, g, g FROM generate_series(1, 5) g")
    config = tmp_path / "vectorsync.toml"
    config.write_text(
        "".join(
            textwrap.dedent(SPEC.format(name=long + suffix, table="items", key="id", columns='"a", "b"')).replace(
                'index = "none"', 'index = "hnsw"'
            )
            # targets that agree on their first 60 bytes: cut to 63 bytes, their index names would too
            + f'target = "vectors_of_an_embedding_whose_target_name_is_long_and_shared_{suffix}"\n'
            for suffix in ("one", "two")
        )
    )
    vectorsync(db_url, config, "migrate")
    indexes = conn.execute(
        "SELECT indexrelid::regclass::text, indrelid::regclass::text FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'hnsw'"
    ).fetchall()
    assert len({index for index, _ in indexes}) == 2 and len({table for _, table in indexes}) == 2
    triggers = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'items'::regclass").fetchall()
    assert len(triggers) == 8 and all(len(name.encode()) <= 63 for (name,) in triggers)
    conn.execute("UPDATE items SET a = a + 1 WHERE id = 1")
    assert sorted(conn.execute("SELECT embedding FROM vectorsync.pending").fetchall()) == [
        (long + "one",), (long + "two",)
    ]


# --- one change row per statement ------------------------------------------------------------


def change_rows(conn: psycopg.Connection) -> list[int]:
    """The number of keys in each ``vectorsync.changes`` row, oldest first."""
    return [r[0] for r in conn.execute("SELECT cardinality(keys) FROM vectorsync.changes ORDER BY enqueued_at")]


def test_each_statement_writes_one_change_row_with_its_keys(conn, items):
    conn.execute("INSERT INTO items (id, a, b) SELECT g, 1, 2 FROM generate_series(100, 2099) g")
    conn.execute("UPDATE items SET a = a + 1 WHERE id BETWEEN 100 AND 599")
    conn.execute("UPDATE items SET note = 'not an input' WHERE id >= 100")  # no input changed: nothing
    conn.execute("UPDATE items SET a = a WHERE id >= 100")  # same values: nothing
    assert change_rows(conn) == [2000, 500]
    assert not conn.execute("SELECT count(*) FROM vectorsync.queue").fetchone()[0]
    assert conn.execute("SELECT count(DISTINCT key) FROM vectorsync.pending").fetchone()[0] == 2000


def pending_keys(conn: psycopg.Connection) -> list[str]:
    return sorted(r[0] for r in conn.execute("SELECT key FROM vectorsync.pending"))


def test_a_one_row_update_writes_its_key_and_the_worker_encodes_it_only_if_an_input_changed(conn, db_url, items):
    embedded_at = "SELECT id, embedded_at FROM items_embeddings WHERE id IN (5, 6) ORDER BY id"
    before = conn.execute(embedded_at).fetchall()
    conn.execute("UPDATE items SET note = 'not an input' WHERE id = 5")  # one row: captured without a comparison
    conn.execute("UPDATE items SET b = b + 1 WHERE id = 6")
    conn.execute("UPDATE items SET a = a WHERE id = 99")  # no row: nothing
    assert change_rows(conn) == [1, 1]
    assert pending_keys(conn) == ["5", "6"]
    vectorsync(db_url, items, "sync")
    after = conn.execute(embedded_at).fetchall()
    assert after[0] == before[0]  # same input hash: dropped before encoding, vector untouched
    assert after[1][1] > before[1][1]
    assert pending_keys(conn) == []


def test_a_one_row_update_of_the_key_queues_both_keys_and_the_old_vector_goes(conn, db_url, items):
    conn.execute("UPDATE items SET id = 1000 WHERE id = 7")
    assert pending_keys(conn) == ["1000", "7"]
    vectorsync(db_url, items, "sync")
    assert vectors_match_source(conn)


def test_one_row_updates_in_a_longer_transaction_are_captured_once_each_and_a_rollback_captures_nothing(
    conn, db_url, items
):
    with psycopg.connect(db_url) as app:
        app.execute("UPDATE items SET a = a + 1 WHERE id = 5")
        app.execute("SAVEPOINT s")
        app.execute("UPDATE items SET a = a + 1 WHERE id = 6")
        app.execute("ROLLBACK TO SAVEPOINT s")
        app.execute("INSERT INTO items (id, a, b) VALUES (500, 1, 2)")
        app.execute("UPDATE items SET b = b + 1 WHERE id = 8")
        assert pending_keys(conn) == []  # nothing visible before commit
        app.commit()
        app.execute("UPDATE items SET a = a + 1 WHERE id = 9")
        app.execute("DELETE FROM items WHERE id = 10")
        app.rollback()
    assert pending_keys(conn) == ["5", "500", "8"]
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id = 10").fetchone()[0] == 1
    vectorsync(db_url, items, "sync")
    assert vectors_match_source(conn)


def test_a_file_reference_keeps_comparing_inputs_for_one_row(conn, db_url, tmp_path):
    # a path's file is read again on every capture (its content may have changed), so a one-row
    # update of another column must not capture it
    conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, path text, note text)")
    conn.execute("INSERT INTO docs SELECT g, 'd' || g || '.txt', '' FROM generate_series(1, 3) g")
    config = tmp_path / "vectorsync.toml"
    config.write_text(textwrap.dedent("""
        [[embeddings]]
        name = "docs"
        table = "docs"
        key = "id"
        modality = "text"
        dim = 4
        index = "none"
        path_column = "path"
        base_dir = "."
        encoder = { type = "lstm", seed = 1, epochs = 1 }
    """))
    vectorsync(db_url, config, "migrate")
    conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
    conn.execute("UPDATE docs SET note = 'x' WHERE id = 1")
    conn.execute("UPDATE docs SET path = 'other.txt' WHERE id = 2")
    assert conn.execute("SELECT key FROM vectorsync.pending").fetchall() == [("2",)]


def test_a_lease_spreads_captured_keys_into_the_queue_once(conn, db_url, items):
    from vectorsync.sync import catalog, queue
    from vectorsync.sync.spec import load_config

    conn.execute("INSERT INTO items (id, a, b) SELECT g, 1, 2 FROM generate_series(100, 399) g")
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        emb = catalog.load(first, load_config(items).embeddings[0])
        assert queue.spread(first, emb) == 300
        assert queue.spread(second, emb) == 0  # skipped while the first transaction holds it
        first.commit()
        second.commit()
    assert change_rows(conn) == []
    assert conn.execute("SELECT count(*), count(DISTINCT key) FROM vectorsync.queue").fetchone() == (300, 300)
    assert conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0] == 300


def test_a_large_delete_leaves_finding_and_deleting_the_vectors_to_the_worker(conn, db_url, items):
    conn.execute("INSERT INTO items (id, a, b) SELECT g, 1, 2 FROM generate_series(100, 1599) g")
    vectorsync(db_url, items, "sync")
    conn.execute("INSERT INTO vectorsync.failed (embedding, key, error, attempts) VALUES ('items', '1500', 'x', 3)")
    conn.execute("DELETE FROM items WHERE id >= 100")  # 1,500 rows: the worker finds which, and deletes
    assert change_rows(conn) == [None]
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id >= 100").fetchone()[0] == 1500
    vectorsync(db_url, items, "sync")
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id >= 100").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM vectorsync.failed").fetchone()[0] == 0
    assert vectors_match_source(conn)
    conn.execute("DELETE FROM items WHERE id <= 3")  # a small delete removes its vectors at once
    assert change_rows(conn) == []
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id <= 3").fetchone()[0] == 0


# --- partitions --------------------------------------------------------------------------------


def test_partitioned_sources_capture_the_parent_each_partition_and_new_partitions(conn, db_url, tmp_path):
    conn.execute(
        "CREATE TABLE items (id integer PRIMARY KEY, a double precision, b double precision, note text) "
        "PARTITION BY RANGE (id)"
    )
    conn.execute("CREATE TABLE items_low PARTITION OF items FOR VALUES FROM (0) TO (100)")
    conn.execute("CREATE TABLE items_high PARTITION OF items FOR VALUES FROM (100) TO (200)")
    conn.execute("INSERT INTO items SELECT g, g % 7, cos(g) FROM generate_series(1, 150) g")
    config = spec(tmp_path / "vectorsync.toml")
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "sync")

    def queued(*, keep: bool = False) -> list[str]:
        keys = sorted((r[0] for r in conn.execute("SELECT key FROM vectorsync.pending")), key=int)
        if not keep:
            conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
        return keys

    conn.execute("INSERT INTO items (id, a) VALUES (199, 1)")  # through the parent
    conn.execute("INSERT INTO items_low (id, a) VALUES (0, 1)")  # straight into a partition
    assert queued() == ["0", "199"]
    conn.execute("UPDATE items_high SET a = a + 1 WHERE id = 120")
    conn.execute("UPDATE items SET a = a + 1 WHERE id = 5")
    conn.execute("UPDATE items SET id = 160 WHERE id = 6")  # moves to the other partition
    assert queued(keep=True) == ["5", "6", "120", "160"]  # 6 vanished: the worker deletes its vector
    vectorsync(db_url, config, "sync")
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id = 6").fetchone()[0] == 0
    conn.execute("CREATE TABLE items_top PARTITION OF items FOR VALUES FROM (200) TO (300)")
    conn.execute("CREATE TABLE items_more (LIKE items)")
    conn.execute("ALTER TABLE items ATTACH PARTITION items_more FOR VALUES FROM (300) TO (400)")
    conn.execute("INSERT INTO items_top (id, a) VALUES (250, 1)")
    conn.execute("INSERT INTO items_more (id, a) VALUES (350, 1)")
    assert queued() == ["250", "350"]
    conn.execute("DELETE FROM items_low WHERE id = 7")
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id = 7").fetchone()[0] == 0
    conn.execute("TRUNCATE items_low")
    assert conn.execute("SELECT min(id) FROM items_embeddings").fetchone()[0] >= 100
    # 100..150, and 160 and 199 that the sync above embedded
    assert conn.execute("SELECT count(*) FROM items_embeddings WHERE id >= 100").fetchone()[0] == 53


def test_status_says_why_an_embedding_is_broken_and_what_to_run(conn, items, cli):
    conn.execute("ALTER TABLE items RENAME COLUMN a TO alpha")
    result = cli("status", config=items)
    assert result.code == 0
    text = " ".join(result.out.split()) + " ".join(result.err.split())
    assert "items is broken: input column a was renamed to alpha" in text
    assert "by `ALTER TABLE items RENAME COLUMN a TO alpha`" in text
    assert "run `vectorsync migrate`" in text


def test_downgrading_below_the_delete_marker_turns_it_into_the_keys_it_stands_for(conn, db_url, items):
    from tests.test_migrations import step

    conn.execute("INSERT INTO items (id, a, b) SELECT g, 1, 2 FROM generate_series(100, 1599) g")
    vectorsync(db_url, items, "sync")
    conn.execute("DELETE FROM items WHERE id >= 100")
    assert change_rows(conn) == [None]
    step(db_url, "downgrade", "0020_capture_per_statement")
    assert change_rows(conn) == [1500]
    step(db_url, "upgrade", "head")
