"""What change capture adds to the application's own statements.

Two identical tables in one database, ``plain`` (no vectorsync) and ``synced`` (an embedding with
its capture triggers, and a vector for every row so that deletes have vectors to remove). The same
statements run against each, alternating, and each figure is the median over the repetitions:

- a 100,000-row INSERT, a 100,000-row UPDATE of an input column, a 100,000-row DELETE of rows that
  have vectors;
- single-row UPDATEs of an input column by primary key, each its own transaction (autocommit, as an
  application issues them), and the same inside one transaction (no commit cost to hide behind);
  single-row INSERTs and DELETEs inside one transaction.

The queue and the captured changes are emptied and both tables vacuumed between repetitions, so
each starts from the same state. The target has no vector index. Only the application's statement
is timed: spreading captured keys into the queue, and deleting the vectors of a large DELETE, are
the worker's work afterwards.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import psycopg

from benchmarks.common import Figure, scratch_database, timer

NAME = "trigger cost"
COLUMNS = (
    "id bigint PRIMARY KEY, name text, category text, price numeric(10, 2), weight real, "
    "rating double precision, stock integer, created_at timestamptz"
)
INPUTS = ["category", "price", "weight", "rating"]
ROWS = "SELECT g, 'item ' || g, 'c' || (g % 20), (g % 1000) / 10.0, g % 37, sin(g), g % 500, now() " \
    "FROM generate_series(1, {rows}) g"


def _tables(conn: psycopg.Connection, rows: int) -> None:
    for table in ("plain", "synced"):
        conn.execute(f"CREATE TABLE {table} ({COLUMNS})")
        conn.execute(f"INSERT INTO {table} " + ROWS.format(rows=rows))


def _install(url: str) -> None:
    from vectorsync.sync import schema
    from vectorsync.sync.spec import parse_config

    config = parse_config(
        {
            "embeddings": [
                {"name": "synced", "table": "synced", "key": "id", "modality": "tabular", "dim": 16,
                 "index": "none", "columns": INPUTS}
            ]
        }
    )
    schema.upgrade(url, config)


def _reset(conn: psycopg.Connection, rows: int, *, embedded: bool) -> None:
    """Both tables hold rows 1..rows, the synced one with a vector for each; nothing queued."""
    for table in ("plain", "synced"):
        conn.execute(f"TRUNCATE {table}")
        conn.execute(f"INSERT INTO {table} " + ROWS.format(rows=rows))
    conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
    # the target is a view over the generation in service, whose vector column is typed by dim
    row = conn.execute(
        "SELECT format('%I.%I', table_schema, table_name) FROM vectorsync.generations "
        "WHERE embedding = 'synced' AND state = 'serving'"
    ).fetchone()
    assert row is not None, "migrate puts a generation in service"
    generation = row[0]
    conn.execute(f"TRUNCATE {generation}")
    if embedded:
        conn.execute(
            f"INSERT INTO {generation} (id, embedding, model_version, input_hash) "
            "SELECT id, array_fill(0.5, ARRAY[16])::vector, 1, 'x' FROM synced"
        )
    for table in ("plain", "synced", generation, "vectorsync.queue", "vectorsync.changes"):
        conn.execute(f"VACUUM ANALYZE {table}")


def _empty(conn: psycopg.Connection) -> None:
    _reset(conn, 0, embedded=False)


def _median_pair(
    conn: psycopg.Connection, repeats: int, prepare: Callable[[], None], statement: Callable[[str], None]
) -> tuple[float, float]:
    """Median seconds of ``statement(table)`` on plain and on synced, alternating which goes first."""
    seconds: dict[str, list[float]] = {"plain": [], "synced": []}
    for repeat in range(repeats):
        order = ("plain", "synced") if repeat % 2 == 0 else ("synced", "plain")
        for table in order:
            prepare()
            with timer() as elapsed:
                statement(table)
            seconds[table].append(elapsed[0])
    return statistics.median(seconds["plain"]), statistics.median(seconds["synced"])


def run(data_dir: Path, quick: bool) -> list[Figure]:
    rows = 10_000 if quick else 100_000
    singles = 300 if quick else 2_000
    repeats = 3
    single_repeats = 5  # single statements are short: more rounds for a steadier median
    figures: list[Figure] = []
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        _tables(conn, rows)
        _install(url)

        def bulk(label: str, sql: str, prepare: Callable[[], None]) -> None:
            base, synced = _median_pair(conn, repeats, prepare, lambda t: conn.execute(sql.format(table=t)))
            figures.append(
                Figure(NAME, f"{label}, {rows:,} rows", synced * 1000, "ms", "same statement, no vectorsync",
                       base * 1000, "ratio ≤ 2")
            )

        bulk("INSERT", "INSERT INTO {table} " + ROWS.format(rows=rows), lambda: _empty(conn))
        bulk("UPDATE of an input column", "UPDATE {table} SET price = price + 1",
             lambda: _reset(conn, rows, embedded=True))
        bulk("DELETE of embedded rows", "DELETE FROM {table}", lambda: _reset(conn, rows, embedded=True))

        def one_by_one(table: str, sql: str, *, transaction: bool) -> None:
            with psycopg.connect(url, autocommit=not transaction) as client:
                for i in range(singles):
                    client.execute(sql.format(table=table), ((i * 7919) % rows + 1,), prepare=True)
                client.commit()

        single = (
            ("UPDATE of an input column", "UPDATE {table} SET price = price + 1 WHERE id = %s", (False, True)),
            ("INSERT", "INSERT INTO {table} (id, category, price) VALUES (%s + 1000000, 'c1', 1)", (True,)),
            ("DELETE", "DELETE FROM {table} WHERE id = %s", (True,)),
        )
        for label, statement, modes in single:
            for transaction in modes:
                base, synced = _median_pair(
                    conn, single_repeats, lambda: _reset(conn, rows, embedded=True),
                    lambda t, s=statement, tx=transaction: one_by_one(t, s, transaction=tx),
                )
                mode = "in one transaction" if transaction else "autocommit"
                figures.append(
                    Figure(NAME, f"single-row {label}, {mode}, per statement", synced / singles * 1e6, "µs",
                           "same statement, no vectorsync", base / singles * 1e6,
                           "ratio ≤ 1.3" if label.startswith("UPDATE") else "-")
                )
    return figures

