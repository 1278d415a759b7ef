"""A new user's first hour (issue 16): truthful commands and one-line errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRODUCTS = """
[[embeddings]]
name = "products"
table = "products"
key = "id"
modality = "tabular"
dim = 2
columns = ["price", "weight"]
encoder = { epochs = 5 }
"""


@pytest.fixture
def products(conn, write_config, cli):
    conn.execute("CREATE TABLE products (id integer PRIMARY KEY, price real, weight real)")
    conn.execute("INSERT INTO products SELECT i, i * 1.5, (i % 7) + 0.5 FROM generate_series(1, 60) AS i")
    config = write_config(PRODUCTS)
    assert cli("migrate", config=config).code == 0
    return config


def test_search_tells_a_missing_row_from_one_not_embedded_yet(products, cli):
    missing = cli("search", "products", "99999", config=products)
    assert missing.code == 1
    assert "no row with id = 99999" in missing.err and "no embedding yet" not in missing.err
    assert "vectorsync sync" not in missing.err
    pending = cli("search", "products", "1", config=products)
    assert pending.code == 1
    assert "row 1 of embedding products has no embedding yet" in pending.err
    assert "hint: run vectorsync sync products" in pending.err


def test_train_refuses_a_dim_that_was_not_migrated(products, cli, conn):
    changed = products.read_text().replace("dim = 2", "dim = 3")
    products.write_text(changed)
    result = cli("train", "products", config=products)
    assert result.code == 1
    assert "sets dim = 3 but was migrated with dim = 2" in result.err
    assert "run `vectorsync migrate`" in result.err
    assert conn.execute("SELECT count(*) FROM vectorsync.models").fetchone()[0] == 0
    assert cli("sync", config=products).code == 1
    assert cli("migrate", config=products).code == 0  # dim 3 becomes a generation of its own
    assert cli("train", "products", config=products).code == 0


def test_sync_and_retry_exit_non_zero_when_rows_failed(products, cli, conn):
    conn.execute("UPDATE products SET price = 'NaN' WHERE id = 7")
    result = cli("sync", config=products)
    assert result.code == 1, result.err
    assert "1 row(s) of products could not be embedded" in result.err
    assert "SELECT key, error FROM vectorsync.failed WHERE embedding = 'products'" in result.err
    assert "vectorsync retry products" in result.err
    again = cli("retry", "products", config=products)
    assert again.code == 1 and "re-queued 1 failed item(s)" in again.err
    conn.execute("UPDATE products SET price = 10.5 WHERE id = 7")
    assert cli("retry", "products", config=products).code == 0
    assert conn.execute("SELECT count(*) FROM products_embeddings").fetchone()[0] == 60


def test_training_summary_accounts_for_every_row(products, cli):
    result = cli("train", "products", config=products)
    assert result.code == 0, result.err
    summary = result.err.strip().splitlines()[-1]
    trained, held = (int(n) for n in re.findall(r"trained on (\d+) rows, (\d+) more held out", summary)[0])
    assert trained + held == 60, summary


def _vectorsync(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vectorsync", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80", **env},
    )


def test_status_fits_80_columns_without_cutting_headers_or_names(products, cli, db_url, conn, tmp_path):
    long_name = "a_rather_long_name_for_the_products"
    products.write_text(products.read_text() + PRODUCTS.replace('name = "products"', f'name = "{long_name}"'))
    assert cli("migrate", config=products).code == 0
    assert cli("sync", config=products).code == 0
    result = _vectorsync("--config", str(products), "status", cwd=tmp_path, env={"VECTORSYNC_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    assert "…" not in result.stdout, result.stdout
    header = next(line for line in lines if "embedded" in line and "pending" in line)
    for word in ("name", "rows", "embedded", "pending", "failed", "model", "lag", "synced"):
        assert word in header.split(), header
    first_column = "".join(line.split()[0] for line in lines[lines.index(header) + 2 :] if line.strip())
    assert long_name in first_column, result.stdout  # wrapped within its column, never cut
    where = result.stderr.splitlines()[0]  # longer than 80 columns, and still one line to copy from
    assert where.startswith(f"config {products}; database ") and "dbname=" in where, result.stderr


def test_status_without_a_config_says_so_instead_of_starting_a_server(tmp_path):
    data = tmp_path / "data"
    result = _vectorsync(
        "--config", str(tmp_path / "vectorsync.toml"), "status", cwd=tmp_path,
        env={"VECTORSYNC_DATA_DIR": str(data), "VECTORSYNC_DATABASE_URL": ""},
    )
    assert result.returncode == 1
    assert "vectorsync.toml' not found and no database URL given" in result.stderr
    assert "hint: run status in your project's folder" in result.stderr
    assert not data.exists(), "no embedded server may be started for a status without a config"


def test_loading_minilm_draws_no_progress_bar_of_its_own():
    pytest.importorskip("sentence_transformers")
    script = (
        "import pandas as pd\n"
        "from vectorsync.encoders.minilm import MiniLMEncoder\n"
        "print(MiniLMEncoder(384, ['t'], {}).encode(pd.DataFrame({'t': ['hello']})).vectors.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TQDM_DISABLE": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 384)"
    assert "Loading weights" not in result.stderr and "it/s" not in result.stderr, result.stderr


def test_a_worker_without_its_database_says_it_is_waiting_and_when_it_tries_next(write_config, tmp_path):
    config = write_config(PRODUCTS)
    process = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "--config", str(config), "worker"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VECTORSYNC_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180  # start-up imports torch: slow on a busy machine
    while time.monotonic() < deadline and sum("waited" in line for line in lines) < 3:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    reader.join(10)
    waits = [line for line in lines if "for the database" in line]
    assert len(waits) >= 3, "".join(lines)
    assert all("next try in" in line and "cannot connect to the database at" in line for line in waits), waits
    assert re.search(r"has waited [1-9]\d*s for the database", waits[-1]), waits[-1]  # how long it has been
    assert not any("Traceback" in line for line in lines)


def test_a_worker_loads_its_models_before_the_first_change(products, cli, db_url):
    from vectorsync.sync.spec import load_config
    from vectorsync.sync.worker import Worker

    assert cli("train", "products", config=products).code == 0
    worker = Worker(db_url, load_config(products), poll_seconds=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not worker._served and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker._served
        assert [key[:2] for key in worker._cache._models] == [("products", 1)]  # before any change arrived
    finally:
        worker.stop.set()
        thread.join(30)


def test_long_lines_are_never_broken_mid_word_at_80_columns(cli, db_url, monkeypatch, tmp_path):
    """Item 7: the demo's database URL (and any hint with a command) stays copyable on a narrow terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("demo", "-k", "3", config=tmp_path / "none.toml")
    assert result.code == 0, result.err
    assert f"database: {db_url}" in (result.out + result.err).splitlines()


def test_db_stop_prints_no_runtime_dir_warning(tmp_path):
    """Item 10: platformdirs' XDG_RUNTIME_DIR warning never reaches the user."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "VECTORSYNC_DATABASE_URL")}
    env["VECTORSYNC_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "vectorsync", "--config", str(tmp_path / "vectorsync.toml"), "db-stop"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "XDG_RUNTIME_DIR" not in result.stderr and "Warning" not in result.stderr
