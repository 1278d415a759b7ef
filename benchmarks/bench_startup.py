"""Start-up of ``vectorsync sync`` and ``vectorsync worker`` with a pretrained text model, once the
model files were checked before (the SHA-256 cache is warm and, for ``int8``, the converted model
is cached).

Each round inserts a batch of new texts and starts a fresh ``sync``, then a fresh worker, for every
precision in turn (the order alternates between rounds, so load bursts on a shared machine fall on
all alike), and reads the two times each command prints: when its first batch began encoding (the
model loaded and the batch read) and when that batch's vectors were written. Medians of the rounds.
The baseline is a bare ``python -c pass``, started the same way in the same rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.common import FIRST_BATCH, Figure, scratch_database

TABLE = "startup_texts"
ROWS_PER_ROUND = 256  # one worker batch
PRECISIONS = ("fp32", "int8", "bf16")


def _config(path: Path) -> Path:
    path.write_text(
        "".join(
            f"""
[[embeddings]]
name = "start_{precision}"
table = "{TABLE}"
key = "id"
modality = "text"
dim = 384
column = "body"
index = "none"
encoder = {{ type = "minilm", precision = "{precision}" }}
"""
            for precision in PRECISIONS
        )
    )
    return path


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "VECTORSYNC_DATABASE_URL": url, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _sync(url: str, config: Path, name: str) -> tuple[float, float]:
    done = subprocess.run(
        [sys.executable, "-m", "vectorsync", "--config", str(config), "sync", name],
        env=_env(url), capture_output=True, text=True, timeout=900,
    )
    found = FIRST_BATCH.search(done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"sync {name} failed: {(done.stdout + done.stderr)[-2000:]}")
    return float(found.group(1)), float(found.group(2))


def _worker(url: str, config: Path, name: str, log: Path) -> tuple[float, float]:
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "--config", str(config), "worker", name],
            env=_env(url), stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 900
        while (found := FIRST_BATCH.search(log.read_text(errors="replace"))) is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} wrote no first batch: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(60)
    return float(found.group(1)), float(found.group(2))


def _bare_python() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def _insert(conn: psycopg.Connection, texts: list[str], first_id: int) -> None:
    with conn.cursor().copy(sql.SQL("COPY {} (id, body) FROM STDIN").format(sql.Identifier(TABLE))) as copy:
        for offset, text in enumerate(texts):
            copy.write_row((first_id + offset, text))


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from tests.text_data import make_corpus

    rounds = 2 if quick else 3
    texts, _ = make_corpus(ROWS_PER_ROUND * (rounds + 1), seed=41)
    times: dict[str, list[tuple[float, float]]] = {f"{kind} {p}": [] for kind in ("sync", "worker") for p in PRECISIONS}
    bare: list[float] = []
    with scratch_database(data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        tmp = data_dir.parent / "startup"
        tmp.mkdir(parents=True, exist_ok=True)
        config = _config(tmp / "startup.toml")
        conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text NOT NULL)").format(
            sql.Identifier(TABLE)))
        subprocess.run([sys.executable, "-m", "vectorsync", "--config", str(config), "migrate"],
                       env=_env(url), check=True, capture_output=True, timeout=600)
        _insert(conn, texts[:ROWS_PER_ROUND], 0)
        for precision in PRECISIONS:  # registers the model, hashes the weights, converts int8: all cached
            _sync(url, config, f"start_{precision}")
        for r in range(rounds):
            bare.append(_bare_python())
            order = PRECISIONS if r % 2 == 0 else tuple(reversed(PRECISIONS))
            first = ROWS_PER_ROUND * (r + 1)
            _insert(conn, texts[first : first + ROWS_PER_ROUND], first)
            for precision in order:  # each embedding has the new rows to embed
                times[f"sync {precision}"].append(_sync(url, config, f"start_{precision}"))
            for precision in order:  # one new row queued for each worker's first batch
                _insert(conn, [texts[r]], 10_000_000 + r * 10 + PRECISIONS.index(precision))
                conn.execute("DELETE FROM vectorsync.queue WHERE embedding <> %s", (f"start_{precision}",))
                times[f"worker {precision}"].append(
                    _worker(url, config, f"start_{precision}", tmp / f"worker-{precision}.log"))
    baseline = statistics.median(bare)
    figures = []
    for name, pairs in times.items():
        began = statistics.median(p[0] for p in pairs)
        written = statistics.median(p[1] for p in pairs)
        print(f"[startup] {name}: began encoding {[p[0] for p in pairs]}, written {[p[1] for p in pairs]}",
              file=sys.stderr)
        figures += [
            Figure("start-up", f"{name}: first batch began encoding (s since start)", began, "s",
                   "python -c pass", baseline, "≤ 2 s"),
            Figure("start-up", f"{name}: first batch written (s since start)", written, "s",
                   "python -c pass", baseline),
        ]
    return figures
