"""Image modality end to end through the database: images in a ``bytea`` column or referenced by
path / ``file://`` URI → ``vectorsync migrate``, ``train``, ``sync`` → similarity search in SQL.

Data: scikit-learn's bundled handwritten digits (8x8, upscaled and stored as PNG) and crops of
scikit-image's colour sample photos; the bad inputs are made here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image
from psycopg import sql

from tests.pg_support import nearest_label_agreement

SIZE = 16  # digits are stored upscaled to 16x16 PNGs
ROWS = 1000

WORKER = """
[worker]
max_attempts = 1
"""

IMAGE_SPEC = """
[[embeddings]]
name = "{name}"
table = "{table}"
key = "id"
modality = "image"
dim = {dim}
distance = "l2"
{input}
image_size = {size}
channels = {channels}
encoder = {{ seed = 0, epochs = {epochs} }}
"""


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def digit_images(rows: int = ROWS) -> tuple[list[bytes], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        png(Image.fromarray((pixels / 16 * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        for pixels in digits.images[:rows]
    ]
    return images, [int(label) for label in digits.target[:rows]]


def spec(name: str, table: str, input_line: str, *, dim: int = 16, size: int = SIZE, channels: int = 1,
         epochs: int = 10) -> str:
    return IMAGE_SPEC.format(
        name=name, table=table, input=input_line, dim=dim, size=size, channels=channels, epochs=epochs
    )


def migrate_train_sync(cli, config: Path, *names: str, failing: bool = False) -> None:
    """``failing``: some rows cannot be embedded, so sync exits 1 and says so."""
    result = cli("migrate", config=config)
    assert result.code == 0, result.err
    for name in names:
        result = cli("train", name, config=config)
        assert result.code == 0, result.err
    result = cli("sync", config=config)
    assert result.code == (1 if failing else 0), result.err
    assert ("could not be embedded" in result.err) == failing




def failed_rows(conn: psycopg.Connection, name: str) -> dict[str, tuple[str, str, int]]:
    rows = conn.execute(
        "SELECT key, column_name, error, attempts FROM vectorsync.failed WHERE embedding = %s", (name,)
    ).fetchall()
    return {key: (column, error, attempts) for key, column, error, attempts in rows}


def vectors(conn: psycopg.Connection, table: str) -> dict[int, np.ndarray]:
    rows = conn.execute(sql.SQL("SELECT id, embedding::real[] FROM {}").format(sql.Identifier(table))).fetchall()
    return {key: np.asarray(vector, dtype=np.float32) for key, vector in rows}


# --- bytea --------------------------------------------------------------------------------------


def test_digits_in_bytea_are_embedded_and_neighbours_share_the_digit(conn, write_config, cli):
    images, labels = digit_images()
    conn.execute("CREATE TABLE digit_images (id int PRIMARY KEY, label int NOT NULL, png bytea)")
    with conn.cursor() as cur:
        rows = list(zip(range(ROWS), labels, images, strict=True))
        cur.executemany("INSERT INTO digit_images VALUES (%s, %s, %s)", rows)
    config = write_config(WORKER + spec("digits", "digit_images", 'column = "png"'))

    migrate_train_sync(cli, config, "digits")

    assert conn.execute("SELECT count(*) FROM digits_embeddings").fetchone()[0] == ROWS
    metrics = conn.execute("SELECT metrics FROM vectorsync.models WHERE embedding = 'digits'").fetchone()[0]
    assert 0 < metrics["holdout_reconstruction_mse"] < 0.05
    agreement = nearest_label_agreement(conn, "digits", {str(i): label for i, label in enumerate(labels)})
    print(f"\ndigits (bytea PNG {SIZE}x{SIZE}) conv autoencoder kNN(5) label agreement via vectorsync.nearest: "
          f"{agreement:.3f} (chance 0.10)")
    assert agreement > 0.8


def _corrupt(good: bytes) -> bytes:
    broken = bytearray(good)
    broken[60:90] = b"\x00" * 30  # inside the image data: the zlib stream or its CRC no longer checks
    return bytes(broken)


def test_bad_images_in_bytea_fail_with_key_column_and_reason_while_the_rest_embed(conn, write_config, cli):
    images, _ = digit_images(200)
    bad = {
        1001: (_corrupt(images[0]), "corrupt or truncated image"),
        1002: (images[1][: len(images[1]) // 2], "corrupt or truncated image"),
        1003: (b"%PDF-1.4\n% not an image\n", "does not hold an image in a format Pillow reads"),
        1004: (png(Image.new("L", (6, 4), 200)), "6x4 px, below the minimum of 8 px"),
        1005: (None, "no image data"),
    }
    conn.execute("CREATE TABLE pictures (id int PRIMARY KEY, png bytea)")
    rows = [(i, image) for i, image in enumerate(images)] + [(key, data) for key, (data, _) in bad.items()]
    rows.sort(key=lambda row: row[0] % 7)  # bad rows are spread among good ones in every batch
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pictures VALUES (%s, %s)", rows)
    config = write_config(WORKER + spec("pictures", "pictures", 'column = "png"', epochs=2))

    migrate_train_sync(cli, config, "pictures", failing=True)  # training skips the unusable images too

    failed = failed_rows(conn, "pictures")
    assert set(failed) == {str(key) for key in bad}
    for key, (_, reason) in bad.items():
        column, error, attempts = failed[str(key)]
        assert (column, attempts) == ("png", 1)
        assert reason in error, error
    assert set(vectors(conn, "pictures_embeddings")) == set(range(len(images)))
    assert conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0] == 0


# --- references ---------------------------------------------------------------------------------


def test_path_and_file_uri_references_embed_the_same_as_bytea(conn, write_config, cli, tmp_path):
    images, labels = digit_images(300)
    folder = tmp_path / "images" / "digits"
    folder.mkdir(parents=True)
    for i, data in enumerate(images):
        (folder / f"{i}.png").write_bytes(data)
    conn.execute("CREATE TABLE scans (id int PRIMARY KEY, png bytea, path text, uri text)")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO scans VALUES (%s, %s, %s, %s)",
            [(i, data, f"digits/{i}.png", (folder / f"{i}.png").as_uri()) for i, data in enumerate(images)],
        )
    base = f'base_dir = "{tmp_path / "images"}"'
    config = write_config(
        WORKER
        + spec("in_row", "scans", 'column = "png"', epochs=4)
        + spec("by_path", "scans", f'path_column = "path"\n{base}', epochs=4)
        + spec("by_uri", "scans", f'path_column = "uri"\n{base}', epochs=4)
    )

    migrate_train_sync(cli, config, "in_row", "by_path", "by_uri")

    in_row, by_path, by_uri = (vectors(conn, f"{n}_embeddings") for n in ("in_row", "by_path", "by_uri"))
    assert set(in_row) == set(by_path) == set(by_uri) == set(range(len(images)))
    # Same images, same keys, same seed: the three models and so their vectors are the same.
    for key in in_row:
        np.testing.assert_allclose(by_path[key], in_row[key], atol=1e-5)
        np.testing.assert_allclose(by_uri[key], in_row[key], atol=1e-5)
    assert failed_rows(conn, "by_path") == failed_rows(conn, "by_uri") == {}
    agreement = nearest_label_agreement(conn, "by_path", {str(i): label for i, label in enumerate(labels)}, step=3)
    print(f"\ndigits by path reference kNN(5) label agreement: {agreement:.3f} (chance 0.10)")
    assert agreement > 0.5


def test_bad_references_fail_with_key_column_and_reason_while_the_rest_embed(conn, write_config, cli, tmp_path):
    images, _ = digit_images(120)
    base = tmp_path / "images"
    base.mkdir()
    for i, data in enumerate(images):
        (base / f"{i}.png").write_bytes(data)
    (tmp_path / "secret.png").write_bytes(images[0])  # exists, but outside base_dir
    (base / "corrupt.png").write_bytes(_corrupt(images[0]))
    (base / "notes.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>')
    (base / "tiny.png").write_bytes(png(Image.new("L", (5, 5), 100)))
    bad = {
        1001: ("corrupt.png", "corrupt or truncated image"),
        1002: ("notes.svg", "does not hold an image in a format Pillow reads"),
        1003: ("tiny.png", "5x5 px, below the minimum of 8 px"),
        1004: ("gone.png", "file not found"),
        1005: ("../secret.png", "points outside base_dir"),
        1006: ((base / "gone.png").as_uri(), "file not found"),
        1007: ("https://example.com/a.png", "unsupported URI scheme 'https'"),
        1008: ("", "the reference is empty"),
        # With base_dir set, absolute paths and file:// URIs must lie inside it too.
        1009: ((tmp_path / "secret.png").as_uri(), "points outside base_dir"),
        1010: (str(tmp_path / "secret.png"), "points outside base_dir"),
        1011: ("file://fileserver/share/a.png", "names host 'fileserver'"),
    }
    conn.execute("CREATE TABLE files (id int PRIMARY KEY, path text)")
    rows = [(i, f"{i}.png") for i in range(len(images))] + [(key, ref) for key, (ref, _) in bad.items()]
    rows.sort(key=lambda row: row[0] % 5)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO files VALUES (%s, %s)", rows)
    config = write_config(WORKER + spec("files", "files", f'path_column = "path"\nbase_dir = "{base}"', epochs=2))

    migrate_train_sync(cli, config, "files", failing=True)

    failed = failed_rows(conn, "files")
    assert set(failed) == {str(key) for key in bad}
    for key, (_, reason) in bad.items():
        column, error, attempts = failed[str(key)]
        assert (column, attempts) == ("path", 1)
        assert reason in error, error
    assert set(vectors(conn, "files_embeddings")) == set(range(len(images)))


# --- colour -------------------------------------------------------------------------------------


def colour_crops(per_photo: int = 40, side: int = 64) -> tuple[list[bytes], list[int]]:
    """Random ``side``-pixel crops of four colour photos; the label is the photo."""
    import skimage.data

    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, photo in enumerate([skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                                   skimage.data.rocket()]):
        height, width = photo.shape[:2]
        for _ in range(per_photo):
            top, left = int(rng.integers(0, height - 2 * side)), int(rng.integers(0, width - 2 * side))
            crop = Image.fromarray(photo[top : top + 2 * side, left : left + 2 * side])
            images.append(png(crop.resize((side, side), Image.Resampling.BILINEAR)))
            labels.append(label)
    return images, labels


def test_colour_images_are_embedded_in_three_channels(conn, write_config, cli):
    images, labels = colour_crops()
    conn.execute("CREATE TABLE photos (id int PRIMARY KEY, png bytea)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO photos VALUES (%s, %s)", list(enumerate(images)))
    config = write_config(WORKER + spec("photos", "photos", 'column = "png"', dim=32, size=64, channels=3, epochs=8))

    migrate_train_sync(cli, config, "photos")

    assert conn.execute("SELECT count(*) FROM photos_embeddings").fetchone()[0] == len(images)
    params = conn.execute("SELECT params FROM vectorsync.models WHERE embedding = 'photos'").fetchone()[0]
    assert (params["channels"], params["image_size"]) == (3, 64)
    agreement = nearest_label_agreement(conn, "photos", {str(i): label for i, label in enumerate(labels)}, step=2)
    print(f"\ncolour 64x64 crops of 4 photos, kNN(5) source-photo agreement: {agreement:.3f} (chance 0.25)")
    assert agreement > 0.6


# --- training -----------------------------------------------------------------------------------


def test_training_streams_the_table_in_chunks(conn, write_config, cli, monkeypatch):
    from vectorsync.sync import sources

    images, _ = digit_images(300)
    conn.execute("CREATE TABLE streamed (id int PRIMARY KEY, png bytea)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO streamed VALUES (%s, %s)", list(enumerate(images)))
    config = write_config(WORKER + spec("streamed", "streamed", 'column = "png"', epochs=2))
    chunk_sizes: list[int] = []
    stream = sources.stream_rows

    def small_chunks(*args, **kwargs):
        for chunk in stream(*args, **{**kwargs, "chunk_rows": 64}):
            chunk_sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(sources, "stream_rows", small_chunks)

    migrate_train_sync(cli, config, "streamed")

    assert max(chunk_sizes) == 64
    assert sum(chunk_sizes) >= 2 * 300  # every epoch streams the table again; nothing is held between
    assert conn.execute("SELECT count(*) FROM streamed_embeddings").fetchone()[0] == 300
