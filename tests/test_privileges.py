"""Roles and privileges, with real roles: a reader sees the embeddings of exactly the tables it may
read, the documented worker role drains the queue, and migrate by a role lacking a privilege stops
before changing anything."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.worker_support import (
    WorkerProcess,
    create_items,
    drained,
    insert_items,
    items_spec,
    prepare,
    vectorsync,
    wait_until,
)
from vectorsync.sync import privileges, schema
from vectorsync.sync.spec import load_config


def as_role(url: str, role: str) -> str:
    info = conninfo_to_dict(url)
    info["user"] = role
    return make_conninfo(**info)


@pytest.fixture
def new_role(conn: psycopg.Connection, pg_server: str) -> Iterator[Callable[[str], str]]:
    """Makes server-wide roles with unique names (plain, LOGIN); drops them after the test."""
    made: list[str] = []

    def make(prefix: str) -> str:
        role = f"{prefix}_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        made.append(role)
        return role

    yield make
    for role in made:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def project(conn, db_url, tmp_path):
    """``items`` migrated, trained and embedded by the owner (this test's superuser)."""
    create_items(conn, 300)
    config = items_spec(tmp_path / "vectorsync.toml", epochs=2)
    prepare(db_url, config)
    vectorsync(db_url, config, "sync")
    return config


QUERIES = {
    "target table": "SELECT count(*) FROM items_embeddings",
    "nearest": "SELECT * FROM vectorsync.nearest('items', '1', 5)",
    "nearest_where": "SELECT * FROM vectorsync.nearest_where('items', '1', 5, '{\"kind\": \"k1\"}')",
    "nearest_to": "SELECT * FROM vectorsync.nearest_to('items', (SELECT embedding FROM items_embeddings LIMIT 1), 5)",
    "knn_join": "SELECT * FROM vectorsync.knn_join('items', NULL, 3)",
    "status view": "SELECT * FROM vectorsync.status",
    "embedding_status": "SELECT * FROM vectorsync.embedding_status('items')",
}


def test_a_role_that_may_read_the_source_may_query_its_embeddings_after_migrate(conn, db_url, project, new_role):
    reader = new_role("reader")
    conn.execute(sql.SQL("GRANT SELECT ON items TO {}").format(sql.Identifier(reader)))
    vectorsync(db_url, project, "migrate")  # mirrors the source's SELECT grants onto the target
    with psycopg.connect(as_role(db_url, reader), autocommit=True) as as_reader:
        for query in QUERIES.values():
            if "nearest_to" in query:
                continue  # its argument reads the target table directly: covered by "target table"
            assert as_reader.execute(query).fetchall()
        assert as_reader.execute(QUERIES["target table"]).fetchone()[0] == 300
        assert len(as_reader.execute(QUERIES["nearest"]).fetchall()) == 5


def test_a_role_that_may_not_read_the_source_learns_no_key_or_distance(conn, db_url, project, new_role, cli):
    outsider = new_role("outsider")
    # even with vectorsync's schema, catalogue and a stray grant on the target table
    for statement in (
        "GRANT USAGE ON SCHEMA vectorsync TO {}",
        "GRANT SELECT ON vectorsync.embeddings, vectorsync.status TO {}",
        "GRANT SELECT ON items_embeddings TO {}",
    ):
        conn.execute(sql.SQL(statement).format(sql.Identifier(outsider)))
    vectorsync(db_url, project, "migrate")  # takes SELECT on the target back: the source is not readable
    with psycopg.connect(as_role(db_url, outsider), autocommit=True) as as_outsider:
        for what, query in QUERIES.items():
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as error:
                as_outsider.execute(query)
            assert re.search("permission denied for (table|view)", str(error.value)), what  # the target is a view
        for table in ("queue", "failed", "errors", "models"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                as_outsider.execute(f"SELECT key FROM vectorsync.{table} LIMIT 1" if table != "models" else
                                    "SELECT version FROM vectorsync.models LIMIT 1")
    result = cli("--database-url", as_role(db_url, outsider), "search", "items", "1", config=project)
    assert result.code == 1
    assert result.err.splitlines()[0] == "error: permission denied for table items, the source of embedding items"


def test_the_catalogue_is_writable_only_by_its_owner(conn, db_url, project, new_role):
    reader = new_role("reader")
    worker = new_role("worker")
    conn.execute(sql.SQL("GRANT SELECT ON items TO {}").format(sql.Identifier(reader)))
    vectorsync(db_url, project, "migrate")
    vectorsync(db_url, project, "grant", "worker", worker)
    for role in (reader, worker):
        with psycopg.connect(as_role(db_url, role), autocommit=True) as other:
            for statement in (
                "UPDATE vectorsync.embeddings SET key_type = 'text'",
                "UPDATE vectorsync.models SET weights = ''",
                "CREATE FUNCTION vectorsync.x() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    other.execute(statement)


def test_the_documented_worker_role_drains_the_queue(conn, db_url, project, new_role, tmp_path):
    worker = new_role("worker")
    vectorsync(db_url, project, "grant", "worker", worker)
    with psycopg.connect(db_url, autocommit=True) as check:
        assert privileges.setup_role(check, "worker", worker, check=True).missing == []
    insert_items(conn, 300, 200)
    conn.execute("UPDATE items SET a = a + 1 WHERE id < 50")
    conn.execute("DELETE FROM items WHERE id BETWEEN 50 AND 59")
    with WorkerProcess(as_role(db_url, worker), project, tmp_path / "worker.log") as process:
        wait_until(lambda: drained(conn, 490) or process.proc.poll() is not None, 180, "the worker role to drain")
        assert process.proc.poll() is None, process.output()
        assert process.terminate() == 0, process.output()
    assert conn.execute("SELECT count(*) FROM vectorsync.failed").fetchone()[0] == 0
    # and nothing more than the documented rights: it cannot read columns outside the spec, nor
    # write the user's rows or vectorsync's catalogue
    with psycopg.connect(as_role(db_url, worker), autocommit=True) as as_worker:
        for statement in (
            "SELECT note FROM items",
            "INSERT INTO items (id) VALUES (100000)",
            "DELETE FROM items",
            "UPDATE vectorsync.embeddings SET current_version = 1",
            "DELETE FROM vectorsync.models",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                as_worker.execute(statement)


def test_grant_check_lists_what_a_role_lacks_and_reader_gets_only_readable_sources(
    conn, db_url, project, new_role, cli
):
    role = new_role("half")
    result = cli("grant", "worker", role, "--check", config=project)
    assert result.code == 1
    assert "missing: SELECT (\"id\", \"a\", \"b\", \"c\", \"kind\") ON TABLE \"public\".\"items\"" in result.out
    assert cli("grant", "reader", role, config=project).code == 0
    with psycopg.connect(as_role(db_url, role), autocommit=True) as as_role_conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role_conn.execute(QUERIES["nearest"])
    conn.execute(sql.SQL("GRANT SELECT ON items TO {}").format(sql.Identifier(role)))
    result = cli("grant", "reader", role, config=project)
    assert result.code == 0 and 'granted SELECT ON TABLE "public"."items_embeddings"' in result.out
    with psycopg.connect(as_role(db_url, role), autocommit=True) as as_role_conn:
        assert len(as_role_conn.execute(QUERIES["nearest"]).fetchall()) == 5


def test_migrate_by_a_role_lacking_a_privilege_stops_before_changing_anything(conn, db_url, tmp_path, new_role):
    create_items(conn, 10)
    config = items_spec(tmp_path / "vectorsync.toml")
    migrator = new_role("migrator")
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    database = conn.execute("SELECT current_database()").fetchone()[0]
    grant = sql.SQL("GRANT CREATE ON DATABASE {} TO {}")
    conn.execute(grant.format(sql.Identifier(database), sql.Identifier(migrator)))
    conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(migrator)))
    with pytest.raises(privileges.PrivilegeError) as error:
        schema.upgrade(as_role(db_url, migrator), load_config(config))
    message = str(error.value)
    assert "\n" not in message
    assert "TRIGGER on table public.items" in message and "embedding 'items'" in message
    assert conn.execute("SELECT to_regnamespace('vectorsync')").fetchone()[0] is None
    assert conn.execute("SELECT to_regclass('items_embeddings')").fetchone()[0] is None
    # and once the owner has migrated, another role may not take the catalogue over
    conn.execute(sql.SQL("GRANT TRIGGER ON items TO {}").format(sql.Identifier(migrator)))
    schema.upgrade(db_url, load_config(config))
    with pytest.raises(privileges.PrivilegeError, match=r"migrate must run as .*the owner of schema vectorsync"):
        schema.upgrade(as_role(db_url, migrator), load_config(config))


def test_every_security_definer_function_pins_its_search_path(conn, project):
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p "
        "WHERE p.pronamespace = 'vectorsync'::regnamespace AND p.prosecdef"
    ).fetchall()
    assert rows, "status counts the queue through a SECURITY DEFINER function"
    for function, config in rows:
        assert "search_path=pg_catalog, pg_temp" in (config or []), function


def test_a_role_cannot_make_status_run_its_own_objects_as_the_owner(conn, db_url, project, new_role):
    attacker = new_role("attacker")
    conn.execute(sql.SQL("GRANT SELECT ON items TO {}").format(sql.Identifier(attacker)))
    conn.execute(sql.SQL("CREATE SCHEMA {0} AUTHORIZATION {0}").format(sql.Identifier(attacker)))
    vectorsync(db_url, project, "migrate")
    with psycopg.connect(as_role(db_url, attacker), autocommit=True) as as_attacker:
        as_attacker.execute("CREATE TABLE calls (by_role text)")
        # the name of what the queue counts call (as the owner), ahead of pg_catalog on the caller's path
        as_attacker.execute(
            "CREATE FUNCTION now() RETURNS timestamptz LANGUAGE sql "
            f"AS $$ INSERT INTO {attacker}.calls VALUES (current_user) RETURNING NULL::timestamptz $$"
        )
        as_attacker.execute(sql.SQL("SET search_path = {}, pg_catalog, public").format(sql.Identifier(attacker)))
        assert as_attacker.execute("SELECT name, pending FROM vectorsync.status").fetchall() == [("items", 0)]
        assert as_attacker.execute("SELECT count(*) FROM vectorsync._backlog('items')").fetchone()[0] == 1
        calls = as_attacker.execute(sql.SQL("SELECT by_role FROM {}.calls").format(sql.Identifier(attacker)))
        assert all(by_role == attacker for (by_role,) in calls.fetchall())


def test_migrate_extends_an_existing_worker_roles_grants_to_a_new_embedding(conn, db_url, project, new_role):
    worker = new_role("worker")
    vectorsync(db_url, project, "grant", "worker", worker)
    conn.execute("CREATE TABLE others (id integer PRIMARY KEY, x real, secret text)")
    with project.open("a") as config:
        config.write('\n[[embeddings]]\nname = "others"\ntable = "others"\nkey = "id"\nmodality = "tabular"\n'
                     'dim = 2\ncolumns = ["x"]\n')
    vectorsync(db_url, project, "migrate")
    with psycopg.connect(db_url, autocommit=True) as check:
        assert privileges.setup_role(check, "worker", worker, check=True).missing == []
    with psycopg.connect(as_role(db_url, worker), autocommit=True) as as_worker:
        as_worker.execute("SELECT id, x FROM others").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_worker.execute("SELECT secret FROM others")


def test_grant_by_a_role_that_may_not_grant_is_one_line(conn, db_url, project, new_role, cli):
    plain, worker = new_role("plain"), new_role("worker")
    result = cli("--database-url", as_role(db_url, plain), "grant", "worker", worker, config=project)
    assert result.code == 1
    owner = conn.execute("SELECT current_user").fetchone()[0]
    assert result.err.strip() == (
        f"error: vectorsync grant must run as '{owner}', the owner of schema vectorsync (connected as '{plain}')"
    )


GRAPH_SPEC = """
[[embeddings]]
name = "people"
table = "people"
key = "id"
modality = "graph"
dim = 16
index = "none"

[embeddings.graph]
edges = "knows"
weight_column = "weight"
"""


def test_the_worker_role_keeps_a_native_graph_fresh(conn, db_url, tmp_path, new_role, monkeypatch):
    from vectorsync.sync import catalog, graph, graph_fastrp

    conn.execute("CREATE TABLE people (id integer PRIMARY KEY, secret text)")
    conn.execute("INSERT INTO people SELECT i, 'private' FROM generate_series(0, 199) i")
    conn.execute("CREATE TABLE knows (source integer, target integer, weight real, note text)")
    conn.execute("INSERT INTO knows SELECT i, (i * 7 + 1) % 200, 1.0, 'private' FROM generate_series(0, 199) i")
    config = tmp_path / "vectorsync.toml"
    config.write_text(GRAPH_SPEC)
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "sync")
    worker = new_role("worker")
    vectorsync(db_url, config, "grant", "worker", worker)
    monkeypatch.setattr(graph_fastrp, "_CACHE", {})  # the worker is another process: it holds no FastRP state yet
    spec = load_config(config).embedding("people")
    with psycopg.connect(as_role(db_url, worker), autocommit=True) as as_worker:
        emb = catalog.load(as_worker, spec)
        conn.execute("INSERT INTO knows VALUES (3, 150, 2.0, 'private')")
        first = graph.sync_graph(as_worker, emb)  # reads the whole graph again
        conn.execute("DELETE FROM knows WHERE source = 5")
        second = graph.sync_graph(as_worker, emb)
        modes = [as_worker.execute("SELECT details ->> 'mode' FROM vectorsync.runs WHERE id = %s", (run["run_id"],))
                 .fetchone()[0] for run in (first, second)]
        assert modes == ["full", "incremental"] and first["embedded"] > 0 and second["embedded"] > 0
        assert graph.sync_graph(as_worker, emb)["embedded"] == 0
        for statement in ("SELECT note FROM knows", "SELECT secret FROM people", "DELETE FROM knows"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                as_worker.execute(statement)


def test_status_as_a_reader_reports_its_embeddings_without_the_workers(conn, db_url, project, new_role, cli):
    reader = new_role("reader")
    conn.execute(sql.SQL("GRANT SELECT ON items TO {}").format(sql.Identifier(reader)))
    assert cli("grant", "reader", reader, config=project).code == 0
    result = cli("--database-url", as_role(db_url, reader), "status", config=project)
    assert result.code == 0, result.err
    assert "items" in result.out
    assert "live workers: not shown, this role may not read vectorsync.workers" in " ".join(result.out.split())
