"""Shared by the examples: a tiny ``flowers`` table (scikit-learn's iris: 150 flowers, 4
measurements, 3 species) with a 3-dimensional tabular embedding, set up through vectorsync's
public API. Running it again reuses the table, the model and the vectors.

The database is ``VECTORSYNC_DATABASE_URL`` or, without it, the embedded PostgreSQL in
``VECTORSYNC_DATA_DIR`` (default ``./.vectorsync``).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from vectorsync.sync import service
from vectorsync.sync.db import connection, resolve_url
from vectorsync.sync.spec import Config, parse_config

MEASUREMENTS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CONFIG = parse_config(
    {
        "embeddings": [
            {
                "name": "flowers",
                "table": "flowers",
                "key": "id",
                "modality": "tabular",
                "dim": 3,
                "columns": MEASUREMENTS,
                "encoder": {"type": "autoencoder", "seed": 1, "epochs": 40},
            }
        ]
    },
    "flowers example",
)


def database_url() -> str:
    return resolve_url(None, None, None)


def load_flowers(conn: psycopg.Connection) -> None:
    from sklearn.datasets import load_iris

    if conn.execute("SELECT to_regclass('flowers') IS NOT NULL").fetchone()[0]:
        return
    iris = load_iris()
    columns = sql.SQL(", ").join(sql.SQL("{} real").format(sql.Identifier(c)) for c in MEASUREMENTS)
    with conn.transaction():
        create = sql.SQL("CREATE TABLE flowers (id integer PRIMARY KEY, species text NOT NULL, {})")
        conn.execute(create.format(columns))
        names = sql.SQL(", ").join(map(sql.Identifier, MEASUREMENTS))
        with conn.cursor().copy(sql.SQL("COPY flowers (id, species, {}) FROM STDIN").format(names)) as copy:
            for i, (row, target) in enumerate(zip(iris.data, iris.target, strict=True)):
                copy.write_row([i, str(iris.target_names[target]), *map(float, row)])


def prepare(url: str) -> Config:
    """Table, schema (migrate), a trained model and up-to-date vectors for ``flowers`` (the first
    sync trains the model)."""
    with connection(url, autocommit=True) as conn:
        load_flowers(conn)
    service.migrate(url, CONFIG)
    service.sync(url, CONFIG, "flowers", batch_size=256)
    return CONFIG
