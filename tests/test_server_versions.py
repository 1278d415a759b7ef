"""Server versions: the embedded default is PostgreSQL 18 + pgvector 0.8, a data folder of the
previous default (PostgreSQL 16) is upgraded in place, features follow the server's pgvector, and
``db-stop`` stops a server that is really running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.pg_support import embedded_server, old_server
from tests.test_foundation import DIGITS_SPEC, load_digits_table
from tests.worker_support import scalar, wait_until
from vectorsync.errors import DatabaseError
from vectorsync.sync import capabilities, embedded


def test_the_embedded_default_is_postgres_18_with_pgvector_0_8(conn):
    found = capabilities.detect(conn)
    assert found.postgres_num >= 180000
    assert found.pgvector is not None and found.pgvector >= (0, 8, 0)
    assert not found.missing()


def test_doctor_reports_versions_and_features(cli):
    result = cli("doctor", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["postgres"].startswith("18")
    assert {f["feature"]: f["on"] for f in report["features"]} == {
        "parallel HNSW builds": True, "halfvec storage": True, "binary quantization": True,
        "iterative index scans": True,
    }


@pytest.fixture(scope="module")
def old_url() -> Iterator[str]:
    pytest.importorskip("pgserver")
    with embedded_server(old=True) as server:
        yield server.get_uri()


def test_an_older_pgvector_turns_features_off_and_refuses_them_in_one_line(old_url):
    with psycopg.connect(old_url) as conn:
        found = capabilities.detect(conn)
    assert found.pgvector == (0, 6, 2)
    assert found.has("parallel HNSW builds")
    assert not found.has("halfvec storage") and not found.has("iterative index scans")
    with pytest.raises(DatabaseError) as caught:
        found.require("halfvec storage", "storage = halfvec")
    assert str(caught.value) == "storage = halfvec needs pgvector >= 0.7; this server has 0.6.2"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder the server's own user can reach (not pytest's private tmp)."""
    root = Path(tempfile.mkdtemp(prefix="vectorsync-upgrade-"))
    root.chmod(0o755)
    yield root
    embedded.stop(root)
    shutil.rmtree(root, ignore_errors=True)


def nearest_answers(url: str) -> list[list[tuple[str, float]]]:
    query = "SELECT * FROM vectorsync.nearest('digits', %s, 5)"
    with psycopg.connect(url) as conn:
        return [[(k, round(d, 5)) for k, d in conn.execute(query, (str(key),))] for key in range(0, 300, 37)]


def test_a_data_folder_of_the_previous_default_is_upgraded_in_place(scratch, cli, write_config, monkeypatch, caplog):
    pytest.importorskip("pgserver")
    server = old_server(scratch / "pgdata")
    url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        columns = load_digits_table(conn, rows=300)
    config = write_config(DIGITS_SPEC.format(columns=", ".join(f'"{c}"' for c in columns)))
    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", url)
    for step in (["migrate"], ["train", "digits"], ["sync"]):
        result = cli(*step, config=config)
        assert result.code == 0, result.err
    before = nearest_answers(url)
    server.cleanup()
    embedded.stop(scratch)
    assert embedded.server_version(scratch) == 16

    monkeypatch.delenv("VECTORSYNC_DATABASE_URL")
    monkeypatch.setenv("VECTORSYNC_DATA_DIR", str(scratch))
    result = cli("db-url", config=config)
    assert result.code == 0, result.err
    assert embedded.server_version(scratch) == 18
    assert any("upgrading the embedded database" in r.getMessage() for r in caplog.records)
    assert (scratch / "pgdata.old").exists()  # the old files stay until the user removes them
    new_url = result.out.strip()
    with psycopg.connect(new_url) as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0] >= "0.8"
    assert nearest_answers(new_url) == before
    assert cli("sync", config=config).code == 0  # and the pipeline goes on


def test_db_stop_stops_a_running_server_even_with_stale_handles(scratch, cli, monkeypatch):
    monkeypatch.delenv("VECTORSYNC_DATABASE_URL")
    monkeypatch.setenv("VECTORSYNC_DATA_DIR", str(scratch))
    assert cli("db-url").code == 0
    pid = embedded.running_pid(scratch)
    assert pid is not None
    # a process that died without cleaning up leaves its PID in the package's handle list
    (scratch / "pgdata" / ".handle_pids.json").write_text(json.dumps([os.getpid() + 999_999]))
    result = cli("db-stop")
    assert result.code == 0 and "stopped" in result.err
    assert embedded.running_pid(scratch) is None
    assert "no embedded server is running" in cli("db-stop").err


def test_db_stop_stops_the_embedded_server_under_a_running_worker(scratch, cli, write_config, monkeypatch):
    monkeypatch.delenv("VECTORSYNC_DATABASE_URL")
    monkeypatch.setenv("VECTORSYNC_DATA_DIR", str(scratch))
    config = write_config(
        """
        [[embeddings]]
        name = "items"
        table = "items"
        key = "id"
        modality = "tabular"
        dim = 2
        index = "none"
        columns = ["a"]
        encoder = { type = "autoencoder", epochs = 1, hidden = [4] }
        """
    )
    url = cli("db-url", config=config).out.strip()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, a float8)")
        conn.execute("INSERT INTO items SELECT g, g FROM generate_series(1, 50) g")
    for step in (["migrate"], ["train", "items"]):
        assert cli(*step, config=config).code == 0
    env = {k: v for k, v in os.environ.items() if k != "VECTORSYNC_DATABASE_URL"}
    log = scratch / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "--config", str(config), "worker"],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                wait_until(lambda: scalar(conn, "SELECT count(*) FROM items_embeddings") == 50, 120,
                           "the worker to embed the table")
            result = cli("db-stop", config=config)
            assert result.code == 0 and "stopped" in result.err, result.err
            assert embedded.running_pid(scratch) is None
            time.sleep(3)  # the worker, its connection gone, retries: it must not start the server again
            assert embedded.running_pid(scratch) is None, log.read_text()
        finally:
            worker.terminate()
            worker.wait(60)
