"""How long until `vectorsync ui`'s Explore page shows neighbours, on 100k vectors (10k with --quick).

The tabular benchmark's clustered table is trained (on 20k rows), synced through the bulk path and
indexed. Then, in one run:

- cold: from creating the app and starting its server to the first Explore page holding the
  neighbour cards (the page a user opens first), and, when Debian's chromium is installed, to the
  cards being rendered in a headless browser;
- warm: the median Explore response over 30 keys, against the median of the same search as plain
  SQL (``SELECT * FROM vectorsync.nearest(...)`` through psycopg) for the same keys: the baseline;
- the map: the first projection (PCA of a 20k-vector sample) and a repeated one (cached).
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from pathlib import Path

import psycopg

from benchmarks.bench_tabular_sync import CATEGORICAL, NUMERIC, generate
from benchmarks.common import Figure, scratch_database, timer

NAME = "ui"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=300) as response:
        return response.read().decode()


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from tests.test_ui import CHROMEDRIVER, CHROMIUM, chromium, serving
    from vectorsync.sync import catalog, schema
    from vectorsync.sync import train as training
    from vectorsync.sync.bulk import sync_embedding
    from vectorsync.sync.spec import parse_config
    from vectorsync.sync.ui.app import Settings, create_app

    rows = 10_000 if quick else 100_000
    figures: list[Figure] = []
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        generate(conn, rows)
        config = parse_config(
            {
                "embeddings": [
                    {
                        "name": "items",
                        "table": "items",
                        "key": "id",
                        "modality": "tabular",
                        "dim": 16,
                        "columns": NUMERIC + CATEGORICAL,
                        "encoder": {"epochs": 3},
                    }
                ]
            }
        )
        schema.upgrade(url, config)
        spec = config.embeddings[0]
        training.train(url, conn, catalog.load(conn, spec), sample=20_000)
        sync_embedding(conn, catalog.load(conn, spec), config.worker, batch_size=2048, url=url)
        keys = [str(k) for k in range(0, rows, rows // 30)][:30]

        started = time.perf_counter()
        with serving(create_app(Settings(url, config))) as base:
            page = _get(f"{base}/explore?embedding=items&key={keys[0]}&k=10")
            cold = time.perf_counter() - started
            assert page.count('class="card"') == 10, "the Explore page shows no neighbours"
            figures.append(Figure(NAME, f"cold start to Explore neighbours ({rows:,} vectors)", cold, "s"))

            sql_ms, page_ms = [], []
            for key in keys:
                with timer() as t:
                    conn.execute("SELECT * FROM vectorsync.nearest('items', %s, 10)", (key,)).fetchall()
                sql_ms.append(t[0] * 1000)
                with timer() as t:
                    _get(f"{base}/explore?embedding=items&key={key}&k=10")
                page_ms.append(t[0] * 1000)
            figures.append(
                Figure(
                    NAME,
                    "Explore page, warm (median of 30 keys)",
                    statistics.median(page_ms),
                    "ms",
                    "vectorsync.nearest via psycopg",
                    statistics.median(sql_ms),
                )
            )
            if CHROMIUM and CHROMEDRIVER:
                generator = chromium()
                driver = next(generator)
                try:
                    for label, key in (("first page in a fresh", keys[1]), ("next Explore page in", keys[2])):
                        with timer() as t:
                            driver.get(f"{base}/explore?embedding=items&key={key}&k=10")
                            assert len(driver.find_elements("css selector", "#neighbours .card")) == 10
                        figures.append(Figure(NAME, f"Explore: {label} headless Chromium", t[0] * 1000, "ms"))
                finally:
                    generator.close()
            with timer() as first:
                _get(f"{base}/api/map/items")
            with timer() as again:
                _get(f"{base}/api/map/items")
            sample = min(rows, 20_000)
            figures.append(Figure(NAME, f"Map: first PCA projection of {sample:,} vectors", first[0], "s"))
            figures.append(Figure(NAME, "Map: the same projection again (cached)", again[0] * 1000, "ms"))
    return figures
