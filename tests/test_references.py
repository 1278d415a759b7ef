"""References are bounded: only regular files inside base_dir (anywhere only by explicit opt-in),
within a size limit and a read timeout, without blocking; images above the spec's pixel budget are
refused before decoding. Every bad reference fails its own row only."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vectorsync.encoders.base import InputError, load_encoder
from vectorsync.encoders.image import cell_image
from vectorsync.sync import models, sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.spec import EmbeddingSpec, SpecError, parse_config


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


def test_a_read_slower_than_read_timeout_fails_its_row_and_later_reads_go_on(base):
    # No regular file that blocks a read can be made here (that takes FUSE or a network mount), so
    # the timeout is shown on a read that is really slow next to it: 128 MiB cannot be read in 1 ms.
    with open(base / "slow.txt", "wb") as handle:
        handle.truncate(128 * 2**20)
    emb = embedding(base_dir=str(base), max_file_bytes=2**30, read_timeout_seconds=0.001)
    values, failures = resolve(emb, ["slow.txt"])
    assert "reading 'slow.txt' took longer than read_timeout_seconds = 0.001" in failures[0]
    assert values == [None]
    # the reader is not held by the read it gave up on: the next batch's files are read
    values, failures = resolve(embedding(base_dir=str(base)), ["good.txt", "good.txt"])
    assert failures == {} and values == ["a good document"] * 2


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


def test_the_pixel_budget_is_the_specs_and_changing_it_needs_no_retraining():
    def spec(max_pixels: int) -> EmbeddingSpec:
        entry = {
            "name": "scans", "table": "scans", "key": "id", "modality": "image", "dim": 4, "column": "picture",
            "image_size": 16, "max_pixels": max_pixels, "encoder": {"type": "conv_autoencoder", "epochs": 1},
        }
        return parse_config({"embeddings": [entry]}).embeddings[0]

    small = png(Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)))
    frame = pd.DataFrame({"picture": [png(Image.fromarray(np.zeros((40, 40), dtype=np.uint8))), small]})
    encoder = models.new_encoder(spec(1000))
    encoder.fit(lambda: iter([pd.DataFrame({"picture": [small] * 8})]), seed=0)
    result = encoder.encode(frame)
    assert "40x40 px, above max_pixels = 1000" in result.failures[0].message and 1 not in result.failures
    # the stored model is loaded with the spec's current budget, as a worker loads it
    runtime = models.encoder_params(spec(2000)).model_dump(exclude_unset=True)
    assert load_encoder(encoder.to_bytes(), runtime=runtime).encode(frame).failures == {}


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
