"""Image ``vectorsync sync`` throughput vs. the encoder's own rate on the same images, in the same run.

For 28x28 greyscale and 64x64 colour PNGs held in a ``bytea`` column: the baseline is
``encoder.encode`` (PNG decode, resize, forward pass) over the same images in batches of the same
size, already in memory; the sync path (``sync.bulk.sync_embedding``) also queues or streams the
rows from Postgres, and writes the vectors with binary COPY. The ratio is sync ÷ baseline; the index
build after a large backfill is excluded (reported by the tabular benchmark).
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


def image_spec(name: str, size: int, channels: int) -> dict:
    return {
        "name": name,
        "table": name,
        "key": "id",
        "modality": "image",
        "dim": 32,
        "column": "png",
        "image_size": size,
        "channels": channels,
        "encoder": {"epochs": 1},
    }


def measure(url: str, conn: psycopg.Connection, config, name: str, images: list[bytes]) -> Figure:
    from sync import catalog, models
    from sync import train as training
    from sync.bulk import sync_embedding

    spec = config.embedding(name)
    emb = catalog.load(conn, spec)
    training.train(url, conn, emb, sample=2000)  # the model's quality does not change its speed
    emb = catalog.load(conn, spec)
    encoder = models.ModelCache().get(conn, emb, models.current_version(conn, name))

    frames = [pd.DataFrame({"png": images[start : start + BATCH]}) for start in range(0, len(images), BATCH)]
    encoder.encode(frames[0].iloc[:64])  # warm-up: first-call allocations
    with timer() as encode_time:
        for frame in frames:
            encoder.encode(frame)
    with timer() as sync_time:
        counts = sync_embedding(conn, emb, config.worker, batch_size=BATCH, url=url)
    assert counts["embedded"] == len(images), counts
    sync_seconds = sync_time[0] - counts.get("index_seconds", 0.0)
    size, channels = spec.image_size, spec.channels
    return Figure(
        "image sync",
        f"images/s, {len(images):,} {size}x{size} {'grey' if channels == 1 else 'colour'} PNGs in bytea",
        len(images) / sync_seconds,
        "images/s",
        "encoder.encode on the same batches",
        len(images) / encode_time[0],
        "ratio ≥ 0.8",
    )


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from sync import schema
    from sync.spec import parse_config

    grey, colour = (4_000, 2_000) if quick else (20_000, 10_000)
    sets = {"digits28": digit_pngs(grey, 28), "photos64": photo_crops(colour, 64)}
    config = parse_config({"embeddings": [image_spec("digits28", 28, 1), image_spec("photos64", 64, 3)]})
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        for name, images in sets.items():
            _load(conn, name, images)
        schema.upgrade(url, config)
        return [measure(url, conn, config, name, images) for name, images in sets.items()]
