"""Model state is data, never code: stored models are safetensors plus JSON, checksummed, and a
crafted registry row is refused with one clear error instead of being executed."""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import pytest
import torch
from safetensors.torch import load as load_tensors

from tests.worker_support import create_items, items_spec, prepare, scalar
from vectorsync.encoders.base import ModelFormatError, load_encoder, model_header


class _RunsAShellCommand:
    """Unpickling this runs ``touch <marker>``: what an attacker who can write vectorsync.models plants."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def items(conn, db_url, tmp_path):
    create_items(conn, 300)
    config = items_spec(tmp_path / "vectorsync.toml", index="none", epochs=1)
    prepare(db_url, config)
    return config


def plant(conn, blob: bytes, sha256: str | None) -> None:
    """Store ``blob`` as model version 2 of ``items`` and put it in service, as a hostile writer would
    (the generation in service names the model that workers load)."""
    conn.execute(
        "INSERT INTO vectorsync.models (embedding, version, encoder_type, dim, weights, sha256) "
        "VALUES ('items', 2, 'autoencoder', 8, %s, %s)",
        (blob, sha256),
    )
    conn.execute("UPDATE vectorsync.embeddings SET current_version = 2 WHERE name = 'items'")
    conn.execute("UPDATE vectorsync.generations SET model_version = 2 WHERE embedding = 'items' AND state = 'serving'")


def pickle_payload(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"type": "autoencoder", "state": _RunsAShellCommand(str(marker))}, buffer)
    return buffer.getvalue()


def test_a_trained_model_is_stored_as_safetensors_with_its_checksum(conn, items):
    blob, recorded = conn.execute("SELECT weights, sha256 FROM vectorsync.models WHERE embedding = 'items'").fetchone()
    blob = bytes(blob)
    assert hashlib.sha256(blob).hexdigest() == recorded
    tensors = load_tensors(blob)  # a plain safetensors file: weights are tensors
    assert any(name.startswith("state.weights.") for name in tensors)
    header = model_header(blob)
    assert header["type"] == "autoencoder" and set(header["state"]["numeric"]) == {"a", "b", "c"}
    restored = load_encoder(blob)
    assert restored.dim == 8


def test_a_crafted_pickle_row_is_refused_with_one_clear_error_and_never_runs(conn, items, cli, tmp_path):
    marker = tmp_path / "owned"
    blob = pickle_payload(marker)
    plant(conn, blob, hashlib.sha256(blob).hexdigest())
    conn.execute("UPDATE items SET a = a + 1 WHERE id < 5")

    result = cli("sync", "items", config=items)

    assert result.code != 0
    assert "model version 2 of embedding 'items' was refused" in result.err
    assert "vectorsync train items" in result.err
    assert "Traceback" not in result.err
    assert not marker.exists()


def test_a_model_stored_by_an_older_vectorsync_asks_for_retraining(conn, items, cli, tmp_path):
    marker = tmp_path / "owned"
    plant(conn, pickle_payload(marker), None)  # before checksums, every model was a pickle

    result = cli("sync", "items", config=items)

    assert result.code != 0
    assert "has no recorded checksum" in result.err and "vectorsync train items" in result.err
    assert not marker.exists()


def test_a_model_row_altered_after_training_is_refused(conn, items, cli):
    blob, recorded = conn.execute("SELECT weights, sha256 FROM vectorsync.models WHERE embedding = 'items'").fetchone()
    altered = bytearray(blob)
    altered[-1] ^= 0xFF
    plant(conn, bytes(altered), recorded)

    result = cli("sync", "items", config=items)

    assert result.code != 0 and "does not match its recorded SHA-256" in result.err
    assert scalar(conn, "SELECT count(*) FROM items_embeddings") == 0


def test_load_encoder_refuses_pickles_and_garbage(tmp_path):
    marker = tmp_path / "owned"
    for blob in (pickle_payload(marker), pickle.dumps(_RunsAShellCommand(str(marker))), b"", b"\xff" * 64):
        with pytest.raises(ModelFormatError):
            load_encoder(blob)
    assert not marker.exists()
