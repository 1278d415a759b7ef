"""Frozen migrations: every revision carries the SQL it installs, and walking the history up and
down reproduces each revision's functions and views exactly."""

from __future__ import annotations

import threading

import psycopg
from alembic import command
from alembic.script import ScriptDirectory

from vectorsync.sync import schema
from vectorsync.sync.db import ensure_vector_extension
from vectorsync.sync.schema import _alembic
from vectorsync.sync.spec import parse_config


def definitions(conn: psycopg.Connection) -> dict[str, str]:
    """Every function and view in the vectorsync schema, by identity, with its full definition."""
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'vectorsync' "
        "UNION ALL SELECT c.oid::regclass::text, pg_get_viewdef(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'vectorsync' AND c.relkind = 'v'"
    ).fetchall()
    return dict(rows)


def history(url: str) -> list[str]:
    cfg, _ = _alembic(url)
    return [s.revision for s in reversed(list(ScriptDirectory.from_config(cfg).walk_revisions()))]


def step(url: str, direction: str, target: str) -> dict[str, str]:
    cfg, engine = _alembic(url)
    with engine.begin() as sa_conn:
        cfg.attributes["connection"] = sa_conn
        getattr(command, direction)(cfg, target)
    engine.dispose()
    with psycopg.connect(url) as conn:
        return definitions(conn)


def differences(got: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Which definitions are missing, extra or changed, by name."""
    return [
        f"{'missing' if name not in got else 'extra' if name not in expected else 'changed'}: {name}"
        for name in sorted(set(got) | set(expected))
        if got.get(name) != expected.get(name)
    ]


def test_walking_every_revision_up_and_down_reproduces_each_revisions_functions(db_url, conn):
    ensure_vector_extension(conn)
    revisions = history(db_url)
    assert len(revisions) >= 5
    at = {"base": definitions(conn)}
    for revision in revisions:
        at[revision] = step(db_url, "upgrade", revision)
    for previous, revision in zip(["base", *revisions[:-1]][::-1], revisions[::-1], strict=True):
        wrong = differences(step(db_url, "downgrade", "-1"), at[previous])
        assert not wrong, f"downgrade of {revision} does not restore {previous}: {wrong}"
    for revision in revisions:
        wrong = differences(step(db_url, "upgrade", revision), at[revision])
        assert not wrong, f"{revision} upgraded a second time differs: {wrong}"


def test_two_migrates_at_once_on_a_new_database_both_succeed(db_url, conn):
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, price real)")
    config = parse_config(
        {"embeddings": [{"name": "items", "table": "items", "key": "id", "modality": "tabular", "dim": 4,
                         "columns": ["price"]}]}
    )
    start = threading.Barrier(2)
    results: list[object] = []

    def migrate() -> None:
        start.wait()
        try:
            results.append(schema.upgrade(db_url, config))
        except Exception as exc:  # the assertion below shows which
            results.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 2 and all(isinstance(r, schema.MigrateReport) for r in results), results
    assert conn.execute("SELECT count(*) FROM vectorsync.embeddings").fetchone()[0] == 1
