"""Start-up: the pretrained weights' SHA-256 is computed once per file version and then taken from
a small cache keyed by the file's size, inode and times; any rewrite of the file is hashed again.
Commands import the heavy libraries (Alembic, SQLAlchemy, torch, sentence-transformers) only when
they use them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.worker_support import (
    REPO,
    WorkerProcess,
    create_items,
    drained,
    insert_items,
    items_spec,
    prepare,
    wait_until,
)
from vectorsync.encoders.minilm import MiniLMEncoder, SentenceTransformerFolder, file_sha256
from vectorsync.errors import ModelFileError

FIRST_BATCH = r"first batch began encoding \d+\.\ds and was written \d+\.\ds after "


def test_the_weights_hash_is_cached_and_a_rewritten_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    assert file_sha256(weights) == hashlib.sha256(b"a" * 4096).hexdigest()
    cache = tmp_path / "cache" / "vectorsync" / "sha256.json"
    entry = json.loads(cache.read_text())[str(weights.resolve())]
    assert entry["sha256"] == hashlib.sha256(b"a" * 4096).hexdigest()

    # a cached answer is what the cache says: proven by planting another digest for the same stamp
    planted = {str(weights.resolve()): {**entry, "sha256": "0" * 64}}
    cache.write_text(json.dumps(planted))
    assert file_sha256(weights) == "0" * 64

    # same size, modification time set back: the change time still moves, so it is hashed again
    before = weights.stat()
    time.sleep(0.05)  # file times tick coarsely
    weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_sha256(weights) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_an_unwritable_cache_only_means_hashing_again(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"c" * 100)
    assert file_sha256(weights) == hashlib.sha256(b"c" * 100).hexdigest()
    assert file_sha256(weights) == hashlib.sha256(b"c" * 100).hexdigest()


def test_sync_and_worker_report_the_time_to_their_first_batch(conn, db_url, tmp_path):
    create_items(conn, 300)
    config = items_spec(tmp_path / "vectorsync.toml", index="none")
    prepare(db_url, config)
    with WorkerProcess(db_url, config, tmp_path / "worker.log") as worker:
        wait_until(lambda: drained(conn, 300), 120, "the worker's first-run backfill")
        wait_until(lambda: "first batch began encoding" in worker.output(), 30, "the worker's time to first batch")
        assert worker.terminate() == 0
    assert re.search(FIRST_BATCH + "the worker started", worker.output())

    insert_items(conn, 300, 200)  # rows for a sync started as a user starts it: a fresh process
    env = {**os.environ, "VECTORSYNC_DATABASE_URL": db_url, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "vectorsync", "--config", str(config), "sync"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(FIRST_BATCH + "the command started", done.stdout + done.stderr)
    assert drained(conn, 500)


#: Libraries that cost a second or more to import, and the commands that need none of them.
HEAVY = ("alembic", "sqlalchemy", "torch", "sentence_transformers", "transformers")


def _imported_after(code: str, modules: tuple[str, ...] = HEAVY) -> set[str]:
    """Which of ``modules`` (the heavy libraries) a fresh interpreter holds after running ``code``."""
    probe = f"import sys\n{code}\nprint('imported:', *[m for m in {modules!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split()[1:])


def test_help_of_the_worker_and_sync_commands_imports_no_heavy_library():
    code = (
        "from vectorsync.sync.cli import main_entry\n"
        "assert main_entry(['worker', '--help']) == 0 and main_entry(['sync', '--help']) == 0"
    )
    assert _imported_after(code) == set()


def test_the_worker_and_sync_code_paths_import_neither_alembic_nor_sqlalchemy_nor_a_model_library():
    # torch and sentence-transformers come with the first model a batch loads, Alembic with `migrate`
    code = "import vectorsync.sync.daemon, vectorsync.sync.service, vectorsync.sync.worker, vectorsync.sync.bulk"
    assert _imported_after(code) == set()
    assert _imported_after(code, ("prometheus_client",)) == set()  # only a worker with --metrics-port needs it


def test_the_alembic_operations_are_registered_inside_an_alembic_run():
    code = (
        "import alembic.op\n"
        "from alembic.operations import Operations\n"
        "import vectorsync.migrations.operations\n"
        "assert hasattr(Operations, 'create_vectorsync_embedding')"
    )
    assert "alembic" in _imported_after(code)


def test_a_model_loading_in_the_background_is_waited_for_and_its_errors_come_from_encode(tmp_path):
    frame = pd.DataFrame({"body": ["a short text", "another, somewhat longer text about cooking"]})
    set_up: list[bool] = []
    loading = MiniLMEncoder(384, ["body"])
    loading.start_loading(1, lambda: set_up.append(True))
    vectors = loading.encode(frame).vectors  # called at once: waits for the load, does not start its own
    assert set_up == [True]
    assert abs(vectors - MiniLMEncoder(384, ["body"]).encode(frame).vectors).max() < 1e-5

    missing = SentenceTransformerFolder(8, ["body"], {"path": str(tmp_path / "no-such-model")})
    missing.start_loading(1, lambda: None)  # the failure is not raised here, in the background
    missing.wait_loaded()
    with pytest.raises(ModelFileError, match="does not exist"):
        missing.encode(frame)


def _mixed_texts() -> list[str]:
    """Short and long texts (some over the model's 256-token limit, chunked), in random order."""
    from tests.text_data import make_corpus

    texts, _ = make_corpus(40, seed=13)
    return [" ".join([t] * (1 + (i % 4) * (i % 7))) for i, t in enumerate(texts)] + ["one"]


def test_minilm_fp32_on_the_cpu_runs_traced_with_the_vectors_of_sentence_transformers():
    from vectorsync.encoders.minilm import minilm_folder

    params = {"device": "cpu", "long_text": "chunk", "token_budget": 1024, "batch_size": 8}
    traced = MiniLMEncoder(384, ["body"], params)
    through_st = SentenceTransformerFolder(384, ["body"], {**params, "path": str(minilm_folder())})
    frame = pd.DataFrame({"body": _mixed_texts()})
    vectors = traced.encode(frame).vectors
    assert traced.runs_converted
    assert abs(vectors - through_st.encode(frame).vectors).max() < 1e-5


def test_minilm_fp32_starts_without_transformers_once_traced(tmp_path, monkeypatch):
    from vectorsync.encoders import traced_text
    from vectorsync.encoders.minilm import MINILM_SHA256, minilm_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    traced = traced_text.traced_model(minilm_folder(), MINILM_SHA256)
    code = (
        "import pandas as pd\n"
        "from vectorsync.encoders.minilm import MiniLMEncoder\n"
        "MiniLMEncoder(384, ['body'], {'device': 'cpu'}).encode(pd.DataFrame({'body': ['a text']}))"
    )
    assert _imported_after(code) == {"torch"}  # the trace was cached: no transformers, no sentence-transformers

    # a cached file that no longer matches its record is traced again, not loaded
    stamp = traced.stat().st_mtime_ns
    with traced.open("ab") as damaged:
        damaged.write(b"x")
    assert traced_text.traced_model(minilm_folder(), MINILM_SHA256) == traced
    assert traced.stat().st_mtime_ns != stamp
    record = json.loads(traced.with_suffix(".json").read_text())
    assert file_sha256(traced) == record["sha256"]
