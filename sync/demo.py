"""``vectorsync demo``: the whole pipeline on a real dataset in the embedded database.

It loads scikit-learn's wine recognition data (178 wines, 13 chemical measurements, 3 cultivars)
into ``demo_wine``, migrates, trains the tabular autoencoder, syncs, and prints each example's
nearest wines with their cultivar, plus how often neighbours share it. Run it again and it reuses
the table and trains a new model version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from vectorsync.sync import service
from vectorsync.sync.db import connection, scalar
from vectorsync.sync.progress import Progress as ProgressCallback
from vectorsync.sync.spec import Config, parse_config

TABLE = "demo_wine"
DEMO_SPEC: dict[str, Any] = {
    "embeddings": [
        {
            "name": "demo_wine",
            "table": TABLE,
            "key": "id",
            "modality": "tabular",
            "dim": 8,
            "columns": [],  # filled from the dataset's feature names
            "encoder": {"type": "autoencoder", "seed": 7},
        }
    ]
}


def load_wine_table(conn: psycopg.Connection) -> list[str]:
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace("/", "_"))
    features = [c for c in frame.columns if c != "target"]
    names = list(data.target_names)
    exists = scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
    if exists and scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))) == len(frame):
        return features
    with conn.transaction():
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
        columns = sql.SQL(", ").join(sql.SQL("{} double precision").format(sql.Identifier(c)) for c in features)
        conn.execute(
            sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, cultivar text NOT NULL, {})").format(
                sql.Identifier(TABLE), columns
            )
        )
        with conn.cursor().copy(
            sql.SQL("COPY {} (id, cultivar, {}) FROM STDIN").format(
                sql.Identifier(TABLE), sql.SQL(", ").join(map(sql.Identifier, features))
            )
        ) as copy:
            for i, row in frame.iterrows():
                copy.write_row([int(i), names[int(row["target"])], *[float(row[c]) for c in features]])
    return features


def run_demo(
    state: Any,
    *,
    k: int,
    console: Console,
    progress: Callable[[], Progress],
    progress_task: Callable[[Progress, str], ProgressCallback],
) -> None:
    started = time.perf_counter()
    url = state.url
    console.print(f"database: {url}")
    with connection(url, autocommit=True) as conn:
        features = load_wine_table(conn)
        raw = {"embeddings": [{**DEMO_SPEC["embeddings"][0], "columns": features}]}
        config: Config = parse_config(raw, "demo spec")
        spec = config.embeddings[0]
        console.print(f"loaded {TABLE}: 178 wines, {len(features)} measurements, 3 cultivars")
        service.migrate(url, config)
        with progress() as bar:
            trained = service.train(url, config, spec.name, progress=progress_task(bar, "train"))
            synced = service.sync(url, config, spec.name, batch_size=512, progress=progress_task(bar, "sync"))
        console.print(
            f"model version {trained.version}: trained on {trained.rows} rows, holdout reconstruction MSE "
            f"{trained.metrics.get('holdout_reconstruction_mse', float('nan')):.4f}; embedded {synced.embedded} rows"
        )
        labels = dict(
            conn.execute(sql.SQL("SELECT id::text, cultivar FROM {}").format(sql.Identifier(TABLE))).fetchall()
        )
        agree = total = 0
        for key in labels:
            for neighbour, _ in conn.execute("SELECT * FROM vectorsync.nearest(%s, %s, %s)", (spec.name, key, k)):
                agree += labels[neighbour] == labels[key]
                total += 1
        for key in ("0", "70", "140"):
            table = Table(title=f"wine {key} ({labels[key]}): nearest {k}")
            table.add_column("wine")
            table.add_column("cultivar")
            table.add_column("cosine distance")
            for neighbour, distance in conn.execute(
                "SELECT * FROM vectorsync.nearest(%s, %s, %s)", (spec.name, key, k)
            ):
                table.add_row(neighbour, labels[neighbour], f"{distance:.4f}")
            console.print(table)
    console.print(
        f"neighbours sharing the cultivar: {agree / total:.1%} (chance is about 34%); "
        f"done in {time.perf_counter() - started:.1f}s. Try: vectorsync search demo_wine 0 -k 5"
    )
