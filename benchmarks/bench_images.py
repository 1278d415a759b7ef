"""Image ``vectorsync sync`` throughput vs. the encoder's own rate on the same images, in the same run.

For 28x28 greyscale and 64x64 colour PNGs held in a ``bytea`` column: the baseline is
``encoder.encode`` (PNG decode, resize, forward pass) over the same images in batches of the same
size, already in memory; the sync path (``sync.service.sync``) also queues or streams the
rows from Postgres, and writes the vectors with binary COPY. The ratio is sync ÷ baseline, measured
without a vector index (the sync path's own cost), and with the HNSW index: excluding, then
including its build after a bulk backfill (or its row-by-row maintenance on the queue path).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
from PIL import Image
from psycopg import sql

from benchmarks.common import Figure, scratch_database, timer

BATCH = 2048  # the ``vectorsync sync`` default


def digit_pngs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """sklearn's digits, upscaled to ``size`` with a random shift and noise so every image differs."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images
    out = []
    for i in range(count):
        pixels = np.kron(digits[i % len(digits)] / 16 * 255, np.ones((3, 3)))  # 24x24
        canvas = np.zeros((size, size))
        top, left = rng.integers(0, size - 24 + 1, 2)
        canvas[top : top + 24, left : left + 24] = pixels
        canvas = (canvas + rng.normal(0, 8, canvas.shape)).clip(0, 255).astype(np.uint8)
        out.append(_png(Image.fromarray(canvas)))
    return out


def photo_crops(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Random ``size``-pixel RGB crops of scikit-image's colour sample photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        out.append(_png(Image.fromarray(photo[top : top + size, left : left + size])))
    return out


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _load(conn: psycopg.Connection, table: str, images: list[bytes]) -> None:
    conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, png bytea NOT NULL)").format(sql.Identifier(table)))
    with conn.cursor().copy(sql.SQL("COPY {} (id, png) FROM STDIN").format(sql.Identifier(table))) as copy:
        for i, data in enumerate(images):
            copy.write_row((i, data))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))


def image_spec(name: str, table: str, size: int, channels: int, index: str) -> dict:
    return {
        "name": name,
        "table": table,
        "key": "id",
        "modality": "image",
        "dim": 32,
        "column": "png",
        "image_size": size,
        "channels": channels,
        "index": index,
        "encoder": {"epochs": 1},
    }


def encode_rate(encoder, images: list[bytes]) -> float:
    """Images/s of ``encoder.encode`` over the images in memory, in sync-sized batches."""
    frames = [pd.DataFrame({"png": images[start : start + BATCH]}) for start in range(0, len(images), BATCH)]
    with timer() as elapsed:
        for frame in frames:
            encoder.encode(frame)
    return len(images) / elapsed[0]


def sync_rate(url: str, conn: psycopg.Connection, config, name: str, rows: int) -> tuple[float, float]:
    """Images/s of ``service.sync``, without and with the index build after a bulk backfill."""
    from vectorsync.sync import catalog, service

    emb = catalog.load(conn, config.embedding(name))
    conn.execute(sql.SQL("TRUNCATE {}").format(emb.target))  # a repeat run starts from no vectors again
    with timer() as elapsed:
        result = service.sync(url, config, name, batch_size=BATCH)
    assert result.embedded == rows, result
    return rows / (elapsed[0] - result.index_seconds), rows / elapsed[0]


def measure(url: str, conn: psycopg.Connection, config, table: str, images: list[bytes]) -> list[Figure]:
    """Train once, register the same model for the indexed twin, then time encode / sync / encode /
    sync: each rate is the best of two runs, so a burst of other load on the machine does not decide it."""
    from vectorsync.sync import catalog, models
    from vectorsync.sync import train as training

    plain, indexed = config.embedding(table), config.embedding(f"{table}_hnsw")
    training.train(url, conn, catalog.load(conn, plain), sample=2000)  # its quality does not change its speed
    encoder = models.ModelCache().get(conn, catalog.load(conn, plain), models.current_version(conn, table))
    with conn.transaction():
        models.store(conn, catalog.load(conn, indexed), encoder, {}, None)
    encoder.encode(pd.DataFrame({"png": images[:64]}))  # warm-up: first-call allocations

    baseline = encode_rate(encoder, images)
    sync_only, _ = sync_rate(url, conn, config, table, len(images))
    baseline = max(baseline, encode_rate(encoder, images))
    sync_only = max(sync_only, sync_rate(url, conn, config, table, len(images))[0])
    excluded, included = sync_rate(url, conn, config, indexed.name, len(images))
    what = f"{len(images):,} {plain.image_size}x{plain.image_size} {'grey' if plain.channels == 1 else 'colour'}"
    same = "encoder.encode, same batches"
    return [
        Figure("image sync", f"images/s, {what} PNGs in bytea, no vector index", sync_only, "images/s",
               same, baseline, "ratio ≥ 0.8"),
        Figure("image sync", f"images/s, {what}, HNSW index (build after a bulk backfill excluded)", excluded,
               "images/s", same, baseline),
        Figure("image sync", f"images/s, {what}, HNSW index maintained or built, all included", included,
               "images/s", same, baseline),
    ]


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from vectorsync.sync import schema
    from vectorsync.sync.spec import parse_config

    grey, colour = (4_000, 2_000) if quick else (20_000, 10_000)
    sets = {"digits28": (digit_pngs(grey, 28), 28, 1), "photos64": (photo_crops(colour, 64), 64, 3)}
    specs = []
    for table, (_, size, channels) in sets.items():
        specs += [image_spec(table, table, size, channels, "none"),
                  image_spec(f"{table}_hnsw", table, size, channels, "hnsw")]
    config = parse_config({"embeddings": specs})
    figures: list[Figure] = []
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        for table, (images, _, _) in sets.items():
            _load(conn, table, images)
        schema.upgrade(url, config)
        for table, (images, _, _) in sets.items():
            figures += measure(url, conn, config, table, images)
    return figures
