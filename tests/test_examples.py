"""Every script in examples/ runs against a real database and prints what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def examples_env(pg_server: str) -> Iterator[dict[str, str]]:
    """One database for the examples: the first trains the flowers model, the others reuse it."""
    name = f"examples_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(**{**conninfo_to_dict(pg_server), "dbname": name})
    yield {**os.environ, "VECTORSYNC_DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def run_example(name: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plain_sql_example(examples_env):
    out = run_example("plain_sql.py", examples_env)
    assert "the 5 flowers nearest to flower 0" in out
    neighbours = out.split("species:\n")[1].split("nearest virginica")[0].strip().splitlines()
    assert len(neighbours) == 5 and all("setosa" in line for line in neighbours)
    assert "k-NN join" in out and "status: flowers: 150/150 embedded, 0 pending, 0 failed" in out


def test_sqlalchemy_orm_example(examples_env):
    out = run_example("sqlalchemy_orm.py", examples_env)
    assert "flower 0 is a setosa" in out
    assert out.count("setosa") >= 6
    assert "async: flowers like 50 (versicolor)" in out or "async: skipped" in out
    after_where = out.split("where=Flower.species != 'setosa'):\n")[1].split("the flower least")[0]
    assert "setosa" not in after_where and len(after_where.strip().splitlines()) == 3


def test_web_service_example(examples_env):
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "web_service.py"), "--port", "0"],
        env=examples_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving on http://"), server.stderr.read()[-3000:]
        base = line.split()[2].split("/similar")[0]
        with urlopen(f"{base}/similar/0?k=3", timeout=30) as response:
            body = json.load(response)
        assert body["id"] == 0 and len(body["similar"]) == 3
        assert all(s["species"] == "setosa" for s in body["similar"])
        assert [s["distance"] for s in body["similar"]] == sorted(s["distance"] for s in body["similar"])
        with pytest.raises(HTTPError) as missing:
            urlopen(f"{base}/similar/999", timeout=30)
        assert missing.value.code == 404 and "has no row with id = 999" in json.load(missing.value)["error"]
    finally:
        server.terminate()
        server.wait(timeout=30)
