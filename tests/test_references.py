"""References are bounded: only regular files inside base_dir (anywhere only by explicit opt-in),
within a size limit, without blocking; huge images are refused before decoding. Every bad reference
fails its own row only."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vectorsync.encoders.base import InputError
from vectorsync.encoders.image import cell_image
from vectorsync.sync import sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.spec import SpecError, parse_config


def embedding(modality: str = "text", **fields: object) -> Embedding:
    entry = {"name": "docs", "table": "docs", "key": "id", "modality": modality, "dim": 8, "path_column": "path"}
    entry.update(fields)
    spec = parse_config({"embeddings": [entry]}).embeddings[0]
    return Embedding.from_spec(spec, "public", key_type="integer")


def resolve(emb: Embedding, references: list[object]) -> tuple[list[object], dict[int, str]]:
    frame = pd.DataFrame({"path": pd.Series(references, dtype=object)})
    failures = sources.resolve_references(emb, frame)
    return frame["path"].tolist(), {position: error.message for position, error in failures.items()}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "good.txt").write_text("a good document")
    return folder


def test_a_path_reference_needs_base_dir_or_an_explicit_opt_in():
    with pytest.raises(SpecError, match=r"'path_column' needs 'base_dir'.*allow_any_path = true"):
        embedding()
    assert embedding(allow_any_path=True).spec.allow_any_path


def test_files_outside_base_dir_are_never_read(base):
    emb = embedding(base_dir=str(base))
    values, failures = resolve(emb, ["/etc/passwd", "file:///etc/passwd", "../../../../etc/passwd", "good.txt"])
    assert values[3] == "a good document"
    assert set(failures) == {0, 1, 2}
    assert all("points outside base_dir" in failures[i] for i in (0, 1, 2))
    assert values[:3] == [None, None, None]


def test_a_malformed_uri_fails_its_row_only(base):
    values, failures = resolve(embedding(base_dir=str(base)), ["file://[abc/etc/passwd", "good.txt"])
    assert "is not a valid URI" in failures[0] and "Invalid IPv6 URL" in failures[0]
    assert values[1] == "a good document" and 1 not in failures


def test_devices_fifos_and_directories_are_refused_without_blocking(base):
    os.mkfifo(base / "pipe")  # no writer: opening it for reading would block forever without O_NONBLOCK
    (base / "folder").mkdir()
    values, failures = resolve(
        embedding(base_dir=str(base), allow_any_path=True, read_timeout_seconds=30),
        ["/dev/zero", "pipe", "folder", "good.txt"],
    )
    assert "not a regular file" in failures[0] and "not a regular file" in failures[1]
    assert "is a directory" in failures[2]
    assert values[3] == "a good document"


def test_a_huge_sparse_file_is_refused_by_size_and_the_other_rows_read(base):
    with open(base / "huge.txt", "wb") as handle:
        handle.truncate(2 * 2**30)  # 2 GiB, sparse: costs no disk, would cost 2 GiB of memory to read
    (base / "big.txt").write_text("x" * 2000)
    emb = embedding(base_dir=str(base), max_file_bytes=1000)
    values, failures = resolve(emb, ["good.txt", "huge.txt", "big.txt", "good.txt"])
    assert "is 2147483648 bytes, above max_file_bytes = 1000" in failures[1]
    assert "above max_file_bytes = 1000" in failures[2]
    assert values[0] == values[3] == "a good document"


def test_the_default_size_limit_depends_on_the_modality(base):
    assert embedding(base_dir=str(base)).spec.max_file_bytes == 16 * 2**20
    assert embedding("image", base_dir=str(base)).spec.max_file_bytes == 64 * 2**20


def test_a_symlink_out_of_base_dir_is_not_followed(base, tmp_path):
    (tmp_path / "secret.txt").write_text("secret")
    (base / "link.txt").symlink_to(tmp_path / "secret.txt")
    values, failures = resolve(embedding(base_dir=str(base)), ["link.txt"])
    assert "points outside base_dir" in failures[0] and values == [None]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_of_9000_by_9000_is_refused_before_decoding():
    data = png(Image.fromarray(np.zeros((9000, 9000), dtype=np.uint16)))
    assert len(data) < 1_000_000  # tiny on disk, 162 MB as pixels, ~2.7 GB through the old decode path
    with pytest.raises(InputError, match="9000x9000 px, above max_pixels = 24000000"):
        cell_image(data, "png")


def test_a_large_jpeg_decodes_reduced_within_the_pixel_budget():
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 5000), (200, 30, 30)).save(buffer, format="JPEG")
    with pytest.raises(InputError, match="above max_pixels"):
        cell_image(buffer.getvalue(), "photo")  # 30 MP at full scale
    image = cell_image(buffer.getvalue(), "photo", draft_size=64)  # decoded at 1/8 scale
    assert image.size == (750, 625)


def test_migrate_warns_about_allow_any_path(conn, write_config, cli):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, path text)")
    config = write_config(
        """
        [[embeddings]]
        name = "docs"
        table = "docs"
        key = "id"
        modality = "text"
        dim = 8
        path_column = "path"
        allow_any_path = true
        """
    )
    result = cli("migrate", config=config)
    assert result.code == 0, result.err
    assert "embedding 'docs' sets allow_any_path = true" in " ".join(result.err.split())
