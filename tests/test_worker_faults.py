"""One item, one embedding or one vanished worker never stops the others.

A worker serves a healthy tabular embedding beside a broken one (a dropped input column, bad
references, duplicate keys, a dim change under it, a row the application holds locked); the
healthy embedding's new rows keep being embedded, measured per row, while the broken items fail
alone or the broken embedding is paused and reported.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
from PIL import Image

from tests.worker_support import WorkerProcess, create_items, scalar, vectorsync, wait_until
from vectorsync.encoders.base import EncodeResult, InputError
from vectorsync.encoders.tabular import TabularAutoencoder
from vectorsync.sync.spec import load_config, parse_config
from vectorsync.sync.worker import Worker, encode_frame, retry_delay

HEADER = """
[worker]
batch_size = 50
max_wait_ms = 10
poll_seconds = 0.5
max_attempts = 2
backoff_seconds = 0.2
max_backoff_seconds = 2

[[embeddings]]
name = "items"
table = "items"
key = "id"
modality = "tabular"
dim = 8
index = "none"
columns = ["a", "b", "c", "kind"]
encoder = { type = "autoencoder", seed = 1, epochs = 3, hidden = [16] }
"""


@contextmanager
def running_worker(url: str, config: Path) -> Iterator[Worker]:
    worker = Worker(url, load_config(config))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop.set()
        thread.join(60)
        assert not thread.is_alive()


class HealthyProbe:
    """Inserts rows into ``items`` one at a time and measures how long each takes to be embedded."""

    def __init__(self, conn: psycopg.Connection, start: int = 100_000) -> None:
        self.conn = conn
        self.next = start
        self.seconds: list[float] = []

    def row(self, timeout: float = 60) -> float:
        key = self.next
        self.next += 1
        self.conn.execute("INSERT INTO items (id, a, b, c, kind) VALUES (%s, 1.5, 0.5, 3, 'k1')", (key,))
        started = time.monotonic()
        wait_until(
            lambda: scalar(self.conn, "SELECT count(*) FROM items_embeddings WHERE id = %s", (key,)),
            timeout,
            f"healthy row {key} to be embedded",
            interval=0.02,
        )
        self.seconds.append(time.monotonic() - started)
        return self.seconds[-1]

    def report(self, what: str) -> str:
        values = np.array(self.seconds)
        return f"{what}: healthy rows embedded in median {np.median(values):.2f}s, max {values.max():.2f}s"


def errors_of(conn: psycopg.Connection, name: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT error FROM vectorsync.errors WHERE embedding = %s", (name,))]


def failed_of(conn: psycopg.Connection, name: str) -> dict[str, str]:
    return dict(conn.execute("SELECT key, error FROM vectorsync.failed WHERE embedding = %s", (name,)).fetchall())


@pytest.fixture
def items(conn):
    create_items(conn, 300)


def test_a_dropped_input_column_pauses_its_embedding_and_the_others_go_on(conn, db_url, tmp_path, items):
    conn.execute("CREATE TABLE dropcol (id int PRIMARY KEY, a float8, b float8)")
    conn.execute("INSERT INTO dropcol SELECT g, g % 7, g % 11 FROM generate_series(1, 200) g")
    config = tmp_path / "vectorsync.toml"
    config.write_text(
        HEADER
        + """
[[embeddings]]
name = "dropcol"
table = "dropcol"
key = "id"
modality = "tabular"
dim = 4
index = "none"
columns = ["a", "b"]
encoder = { type = "autoencoder", seed = 1, epochs = 3, hidden = [8] }
"""
    )
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "train", "dropcol")
    probe = HealthyProbe(conn)
    with running_worker(db_url, config):
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM dropcol_embeddings") == 200, 120, "dropcol embedded")
        conn.execute("ALTER TABLE dropcol DROP COLUMN b")
        conn.execute("INSERT INTO dropcol (id, a) VALUES (1000, 1)")
        for _ in range(10):
            probe.row()
        wait_until(lambda: any("DROP COLUMN b" in e for e in errors_of(conn, "dropcol")), 30, "the drift reported")
        sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_start > %s"
        reported_at = scalar(conn, "SELECT now()")
        for _ in range(5):
            probe.row()
        time.sleep(3)  # several retries of the paused embedding
        assert scalar(conn, sessions, (reported_at,)) == 0  # an error loop opens no new session
    print("\n" + probe.report("dropped input column of another embedding"))
    reported = errors_of(conn, "dropcol")
    assert any("is broken" in e and "vectorsync migrate" in e for e in reported), reported
    assert len(reported) <= 2  # reported once, not once per retry
    # No item is charged for the embedding's own breakage: nothing of it lands in vectorsync.failed.
    assert failed_of(conn, "dropcol") == {}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_references_fail_alone_while_a_healthy_embedding_keeps_up(conn, db_url, tmp_path, items):
    base = tmp_path / "scans"
    base.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        (base / f"{i}.png").write_bytes(png(Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))))
    os.mkfifo(base / "pipe")
    with open(base / "sparse.png", "wb") as handle:
        handle.truncate(2 * 2**30)
    (base / "wide.png").write_bytes(png(Image.fromarray(np.zeros((9000, 9000), dtype=np.uint16))))
    bad = {
        "1001": ("file://[abc/etc/passwd", "is not a valid URI"),
        "1002": ("/etc/passwd", "points outside base_dir"),
        "1003": ("pipe", "not a regular file"),
        "1004": ("sparse.png", "above max_file_bytes"),
        "1005": ("wide.png", "above max_pixels"),
        "1006": ("../../../../../dev/zero", "points outside base_dir"),
    }
    conn.execute("CREATE TABLE scans (id int PRIMARY KEY, path text)")
    conn.execute("INSERT INTO scans SELECT g, g || '.png' FROM generate_series(0, 39) g")
    config = tmp_path / "vectorsync.toml"
    config.write_text(
        HEADER
        + f"""
[[embeddings]]
name = "scans"
table = "scans"
key = "id"
modality = "image"
dim = 4
index = "none"
path_column = "path"
base_dir = "{base}"
max_file_bytes = 1000000
image_size = 16
encoder = {{ type = "conv_autoencoder", epochs = 1, width = 8 }}
"""
    )
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "train", "scans")
    probe = HealthyProbe(conn)
    with running_worker(db_url, config):
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM scans_embeddings") == 40, 120, "the good scans")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO scans VALUES (%s, %s)", [(int(k), ref) for k, (ref, _) in bad.items()])
            cur.execute("INSERT INTO scans VALUES (2000, '7.png')")  # a good row in the same batch
        for _ in range(10):
            probe.row()
        wait_until(lambda: len(failed_of(conn, "scans")) == len(bad), 60, "every bad reference to fail")
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM scans_embeddings WHERE id = 2000"), 30, "the good row")
        probe.row()
    print("\n" + probe.report("bad references in another embedding"))
    failed = failed_of(conn, "scans")
    for key, (_, reason) in bad.items():
        assert reason in failed[key], failed[key]


def test_duplicate_keys_fail_alone_and_the_rest_of_the_batch_embeds(conn, db_url, tmp_path, items):
    config = tmp_path / "vectorsync.toml"
    config.write_text(HEADER)
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    conn.execute("ALTER TABLE items DROP CONSTRAINT items_pkey")  # after migrate: the key is no longer unique
    conn.execute("INSERT INTO items (id, a, b, c, kind) VALUES (7, 1, 1, 1, 'k1')")
    probe = HealthyProbe(conn)
    with running_worker(db_url, config):
        wait_until(lambda: "7" in failed_of(conn, "items"), 60, "the duplicated key to fail")
        for _ in range(5):
            probe.row()
    assert "key '7' matches 2 rows of table 'items'" in failed_of(conn, "items")["7"]
    assert scalar(conn, "SELECT count(*) FROM items_embeddings") == 299 + 5


class _FailsOnHuge(TabularAutoencoder):
    """An encoder that runs out of memory on one input value, as a real model might on one huge row."""

    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        if (batch["text"] == "huge").any():
            raise MemoryError("cannot allocate 64 GiB")
        return EncodeResult(np.ones((len(batch), self.dim), dtype=np.float32))


def test_an_encoder_memory_error_fails_only_the_row_that_caused_it():
    spec = parse_config(
        {"embeddings": [{"name": "t", "table": "t", "key": "id", "modality": "text", "dim": 3, "column": "text"}]}
    ).embeddings[0]
    from vectorsync.sync.catalog import Embedding

    emb = Embedding.from_spec(spec, "public", key_type="integer")
    frame = pd.DataFrame({"text": ["a", "b", "huge", "c", "d", "e", "f"]})
    vectors, failures = encode_frame(_FailsOnHuge(3, ["text"]), frame, {0: InputError("text", "bad")}, emb)
    assert set(failures) == {2}
    assert "MemoryError: cannot allocate 64 GiB" in failures[2].message
    assert (vectors[[1, 3, 4, 5, 6]] == 1).all() and (vectors[[0, 2]] == 0).all()


def _address_space(pid: int) -> int:
    """Bytes of virtual memory process ``pid`` has mapped now (VmSize)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for process {pid}")


def test_a_memory_error_in_a_real_worker_process_fails_only_its_row(conn, db_url, tmp_path):
    base = tmp_path / "scans"
    base.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        (base / f"{i}.png").write_bytes(png(Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))))
    with open(base / "huge.png", "wb") as handle:
        handle.truncate(1536 * 2**20)  # sparse: no disk, but reading it needs 1.5 GiB more than the worker may map
    conn.execute("CREATE TABLE scans (id int PRIMARY KEY, path text)")
    conn.execute("INSERT INTO scans SELECT g, g || '.png' FROM generate_series(0, 39) g")
    config = tmp_path / "vectorsync.toml"
    config.write_text(
        HEADER.split("[[embeddings]]")[0]
        + f"""
[[embeddings]]
name = "scans"
table = "scans"
key = "id"
modality = "image"
dim = 4
index = "none"
path_column = "path"
base_dir = "{base}"
max_file_bytes = {2 * 2**30}
image_size = 16
encoder = {{ type = "conv_autoencoder", epochs = 1, width = 8 }}
"""
    )
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "scans")
    with WorkerProcess(db_url, config, tmp_path / "worker.log") as worker:
        first = "SELECT count(*) FROM scans_embeddings"
        wait_until(lambda: scalar(conn, first) == 40 or worker.proc.poll() is not None, 120, "the first scans")
        assert worker.proc.poll() is None, worker.output()
        # a real allocation failure: the worker may map 512 MiB more than it does now, not 1.5 GiB
        limit = _address_space(worker.pid) + 512 * 2**20
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        conn.execute("INSERT INTO scans VALUES (1000, 'huge.png'), (1001, '3.png'), (1002, '4.png')")  # one batch
        wait_until(lambda: "1000" in failed_of(conn, "scans") or worker.proc.poll() is not None, 120,
                   "the huge row to fail")
        assert worker.proc.poll() is None, worker.output()
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM scans_embeddings WHERE id > 1000") == 2, 30,
                   "the other rows of its batch")
        conn.execute("INSERT INTO scans VALUES (1003, '5.png')")  # and the worker goes on
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM scans_embeddings WHERE id = 1003"), 30, "a later row")
        assert worker.terminate() == 0, worker.output()
    assert "MemoryError" in failed_of(conn, "scans")["1000"]
    assert list(failed_of(conn, "scans")) == ["1000"]


def test_a_row_the_application_holds_locked_is_requeued_not_waited_for(conn, db_url, tmp_path, items):
    config = tmp_path / "vectorsync.toml"
    config.write_text(HEADER)
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    conn.execute("UPDATE items SET a = 42 WHERE id = 5")
    probe = HealthyProbe(conn)
    with psycopg.connect(db_url) as app, running_worker(db_url, config):
        app.execute("SELECT * FROM items WHERE id = 5 FOR UPDATE")  # held by the application's open transaction
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") == 299, 60, "the unlocked rows")
        for _ in range(10):
            probe.row()
        assert scalar(conn, "SELECT count(*) FROM items_embeddings WHERE id = 5") == 0
        assert scalar(conn, "SELECT count(*) FROM vectorsync.pending WHERE key = '5'") >= 1
        app.commit()  # the application lets go: the row is embedded soon after
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings WHERE id = 5"), 30, "the locked row")
    print("\n" + probe.report("a source row held FOR UPDATE by the application"))
    assert failed_of(conn, "items") == {}


def test_a_recreated_and_retrained_model_is_used_by_a_running_worker(conn, db_url, tmp_path, items):
    from tests.worker_support import assert_vectors_match_rows

    config = tmp_path / "vectorsync.toml"
    config.write_text(HEADER)
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    with running_worker(db_url, config):
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") == 300, 60, "the first vectors")
        first = scalar(conn, "SELECT sha256 FROM vectorsync.models WHERE embedding = 'items'")
        config.write_text(HEADER.replace("epochs = 3", "epochs = 5"))  # other weights, same version number
        vectorsync(db_url, config, "migrate", "--recreate", "items")
        vectorsync(db_url, config, "train", "items")
        assert scalar(conn, "SELECT version FROM vectorsync.models WHERE embedding = 'items'") == 1
        assert scalar(conn, "SELECT sha256 FROM vectorsync.models WHERE embedding = 'items'") != first
        conn.execute("UPDATE items SET b = b + 1")  # every row queued again
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") == 300, 60, "the new vectors")
        wait_until(lambda: not scalar(conn, "SELECT count(*) FROM vectorsync.pending"), 60, "the queue to drain")
    # Every stored vector is what the new model (loaded afresh) computes: no stale cached weights.
    assert assert_vectors_match_rows(conn, config) == 300


def test_a_dim_change_under_a_running_worker_pauses_that_embedding_and_says_what_to_do(
    conn, db_url, tmp_path, items
):
    conn.execute("CREATE TABLE other (id int PRIMARY KEY, a float8, b float8)")
    conn.execute("INSERT INTO other SELECT g, g % 7, g % 11 FROM generate_series(1, 200) g")
    other = """
[[embeddings]]
name = "other"
table = "other"
key = "id"
modality = "tabular"
dim = {dim}
index = "none"
columns = ["a", "b"]
encoder = {{ type = "autoencoder", seed = 1, epochs = 3, hidden = [8] }}
"""
    config = tmp_path / "vectorsync.toml"
    config.write_text(HEADER + other.format(dim=4))
    changed = tmp_path / "changed.toml"
    changed.write_text(HEADER + other.format(dim=2))
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "train", "other")
    probe = HealthyProbe(conn)
    with running_worker(db_url, config):  # keeps serving with dim = 4
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM other_embeddings") == 200, 120, "other embedded")
        vectorsync(db_url, changed, "migrate", "--recreate", "other")
        vectorsync(db_url, changed, "train", "other")
        conn.execute("INSERT INTO other VALUES (1000, 1, 2)")
        for _ in range(10):
            probe.row()
        wait_until(
            lambda: any("was migrated with dim = 2" in e for e in errors_of(conn, "other")), 60, "the dim change"
        )
        probe.row()
    print("\n" + probe.report("a dim change of another embedding under the worker"))
    reported = [e for e in errors_of(conn, "other") if "was migrated with dim = 2" in e]
    assert "sets dim = 4" in reported[0] and "run `vectorsync migrate`" in reported[0], reported
    assert failed_of(conn, "other") == {}


RENCOL = """
[[embeddings]]
name = "rencol"
table = "rencol"
key = "id"
modality = "tabular"
dim = 4
index = "none"
columns = [{columns}]
encoder = {{ type = "autoencoder", seed = 1, epochs = 3, hidden = [8] }}
"""


def test_a_renamed_input_column_keeps_its_model_once_the_spec_is_fixed_and_migrate_runs(
    conn, db_url, tmp_path, items, cli
):
    """The whole story: rename -> the application's writes succeed -> status says what broke and
    what to run -> spec fixed + migrate -> new and changed rows embed with the same model, no
    retrain; the other embedding is served throughout."""
    conn.execute("CREATE TABLE rencol (id int PRIMARY KEY, a float8, b float8)")
    conn.execute("INSERT INTO rencol SELECT g, g % 7, cos(g) FROM generate_series(1, 200) g")
    config = tmp_path / "vectorsync.toml"
    config.write_text(HEADER + RENCOL.format(columns='"a", "b"'))
    vectorsync(db_url, config, "migrate")
    vectorsync(db_url, config, "train", "items")
    vectorsync(db_url, config, "train", "rencol")
    probe = HealthyProbe(conn)
    with running_worker(db_url, config):
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM rencol_embeddings") == 200, 120, "rencol embedded")
        before = dict(conn.execute("SELECT id, embedding::text FROM rencol_embeddings").fetchall())
        conn.execute("ALTER TABLE rencol RENAME COLUMN b TO bee")
        conn.execute("INSERT INTO rencol (id, a, bee) VALUES (1000, 5 % 7, cos(5))")  # row 5's inputs
        conn.execute("UPDATE rencol SET a = 3, bee = cos(3) WHERE id = 20")  # now row 3's inputs
        conn.execute("DELETE FROM rencol WHERE id = 30")
        for _ in range(5):
            probe.row()
    status = cli("status", config=config)
    said = status.out + status.err
    assert "rencol is broken" in said and "RENAME COLUMN b TO bee" in said and "vectorsync migrate" in said, said
    stale = tmp_path / "stale.toml"
    stale.write_text(config.read_text())
    config.write_text(HEADER + RENCOL.format(columns='"a", "bee"'))
    vectorsync(db_url, config, "migrate")
    with running_worker(db_url, stale):  # a worker still on the old config says what to do
        wait_until(lambda: any("restart it with the config" in e for e in errors_of(conn, "rencol")), 60,
                   "the stale worker to report its config")
        probe.row()
    same = (
        "SELECT (SELECT embedding FROM rencol_embeddings WHERE id = %s) "
        "<-> (SELECT embedding FROM rencol_embeddings WHERE id = %s) < 1e-5"
    )
    with running_worker(db_url, config):
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM rencol_embeddings WHERE id = 1000"), 60, "the new row")
        wait_until(lambda: scalar(conn, same, (20, 3)), 60, "the changed row")
        conn.execute("UPDATE rencol SET a = 7 % 7, bee = cos(7) WHERE id = 21")  # a change after the repair
        wait_until(lambda: scalar(conn, same, (21, 7)), 60, "a row changed after the repair")
        probe.row()
    print("\n" + probe.report("a renamed input column of another embedding"))
    assert scalar(conn, same, (1000, 5))  # the model read bee where it was trained on b
    assert scalar(conn, "SELECT count(*) FROM rencol_embeddings WHERE id = 30") == 0
    assert conn.execute("SELECT version FROM vectorsync.models WHERE embedding = 'rencol'").fetchall() == [(1,)]
    assert failed_of(conn, "rencol") == {}
    after = dict(conn.execute("SELECT id, embedding::text FROM rencol_embeddings").fetchall())
    assert {k: v for k, v in after.items() if k not in (20, 21, 1000)} == {
        k: v for k, v in before.items() if k not in (20, 21, 30)
    }


def test_an_items_backoff_doubles_per_attempt_up_to_its_cap_and_is_jittered():
    settings = parse_config({"worker": {"backoff_seconds": 0.2, "max_backoff_seconds": 2}, "embeddings": []}).worker
    for attempt in range(1, 9):
        delays = [retry_delay(settings, attempt) for _ in range(200)]
        planned = min(0.2 * 2 ** (attempt - 1), 2)
        assert planned <= min(delays) and max(delays) <= planned * 1.25
        assert len(set(delays)) > 100  # items that failed together do not retry together


def test_a_broken_embeddings_retries_by_one_worker_grow_apart(conn, db_url, tmp_path, caplog):
    conn.execute("CREATE TABLE dropcol (id int PRIMARY KEY, a float8, b float8)")
    config = tmp_path / "vectorsync.toml"
    config.write_text(
        HEADER.replace("max_backoff_seconds = 2", "max_backoff_seconds = 60").split("[[embeddings]]")[0]
        + RENCOL.replace("rencol", "dropcol").format(columns='"a", "b"')
    )
    vectorsync(db_url, config, "migrate")
    conn.execute("ALTER TABLE dropcol DROP COLUMN b")
    caplog.set_level(logging.DEBUG, logger="vectorsync.worker")

    def tries() -> list[float]:
        return [
            r.created for r in caplog.records
            if "paused embedding dropcol" in r.getMessage() or "dropcol still unavailable" in r.getMessage()
        ]

    with running_worker(db_url, config):
        wait_until(lambda: len(tries()) >= 4, 60, "four tries of the broken embedding")
    times = tries()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # 1 s, 2 s, 4 s (each up to +25 %): the worker probes a broken embedding less and less often
    assert gaps[2] > gaps[0] * 1.5, gaps
