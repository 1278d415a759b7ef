"""Graphs as a live modality: change capture on node and edge tables, incremental FastRP equal to a
full recompute, and the no-change sync that does no graph work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from vectorsync.encoders import fastrp as fastrp_module
from vectorsync.encoders.fastrp import Edges, FastRPParams, IncrementalFastRP, fastrp
from vectorsync.sync import graph_fastrp

# --- the encoder's incremental state -------------------------------------------------------------


def _random_graph(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rng.integers(0, n, m), rng.integers(0, n, m), rng.uniform(0.5, 2.0, m)


@pytest.mark.parametrize(
    "params",
    [
        FastRPParams(dim=64, iteration_weights=(0.0, 1.0, 1.0)),
        FastRPParams(dim=64, iteration_weights=(0.5, 1.0, 1.0), node_self_influence=0.7, normalization_strength=-0.5,
                     property_ratio=0.25),
        FastRPParams(dim=32, iteration_weights=(1.0, 1.0), orientation="natural"),
    ],
    ids=["plain", "features-degrees-self", "directed"],
)
def test_incremental_updates_equal_a_full_recompute(params: FastRPParams) -> None:
    rng = np.random.default_rng(5)
    n, m = 20_000, 40_000
    src, dst, weights = _random_graph(rng, n, m)
    features = rng.normal(size=(n, 6)) if params.property_dim else None
    state = IncrementalFastRP(params, np.arange(n) * 7, Edges(src, dst, weights), features)
    modes = []
    for _ in range(4):  # inserts, deletes and weight changes, four times over
        inserted = rng.integers(0, n, (6, 2))
        dropped = rng.choice(len(src), 8, replace=False)
        reweighted = dropped[4:]
        added = Edges(
            np.concatenate([inserted[:, 0], src[reweighted]]),
            np.concatenate([inserted[:, 1], dst[reweighted]]),
            np.concatenate([rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 4)]),
        )
        removed = Edges(src[dropped], dst[dropped], weights[dropped])
        result = state.update(added=added, removed=removed)
        modes.append(result.mode)
        keep = np.ones(len(src), dtype=bool)
        keep[dropped] = False
        src = np.concatenate([src[keep], added.src])
        dst = np.concatenate([dst[keep], added.dst])
        weights = np.concatenate([weights[keep], added.weights])
        full = fastrp(n, src, dst, weights, features=features, node_ids=np.arange(n) * 7,
                      **{k: getattr(params, k) for k in ("dim", "iteration_weights", "node_self_influence",
                                                          "normalization_strength", "orientation", "property_ratio",
                                                          "random_seed")})
        assert np.abs(state.embedding(np.arange(n)) - full).max() <= 1e-5
        untouched = np.setdiff1d(np.arange(n), result.written)
        assert np.abs(state.embedding(untouched) - full[untouched]).max() <= 1e-5
    assert modes == ["incremental"] * 4


def test_node_inserts_deletes_and_feature_changes_equal_a_full_recompute() -> None:
    rng = np.random.default_rng(8)
    n, m = 5_000, 15_000
    src, dst, weights = _random_graph(rng, n, m)
    features = rng.normal(size=(n, 4))
    params = FastRPParams(dim=32, iteration_weights=(0.0, 1.0, 1.0), property_ratio=0.5, normalization_strength=-0.3)
    state = IncrementalFastRP(params, np.arange(n), Edges(src, dst, weights), features)
    # two new nodes with edges, one node removed (its edges go), one node with new features
    new = state.add_nodes(np.array([n, n + 1]))
    gone, recoloured = 17, 42
    new_edges = Edges(np.array([new[0], new[1], 3]), np.array([5, new[0], new[1]]), np.array([1.0, 2.0, 0.5]))
    kept = (src != gone) & (dst != gone)
    around = kept & ((src == recoloured) | (dst == recoloured))
    features_after = np.vstack([features, rng.normal(size=(2, 4))])
    features_after[recoloured] = rng.normal(size=4)
    current = Edges(np.concatenate([src[around], new_edges.src]), np.concatenate([dst[around], new_edges.dst]),
                    np.concatenate([weights[around], new_edges.weights]))
    reset = np.array([gone, recoloured, *new])
    result = state.update(added=current, reset=reset, dead=np.array([gone]),
                          features=features_after[reset])
    assert result.mode == "incremental" and not state.alive[gone]
    all_src = np.concatenate([src[kept], new_edges.src])
    all_dst = np.concatenate([dst[kept], new_edges.dst])
    all_w = np.concatenate([weights[kept], new_edges.weights])
    full = fastrp(n + 2, all_src, all_dst, all_w, dim=32, iteration_weights=[0, 1, 1], property_ratio=0.5,
                  normalization_strength=-0.3, features=features_after, node_ids=np.arange(n + 2))
    live = np.flatnonzero(state.alive)
    assert np.abs(state.embedding(live) - full[live]).max() <= 1e-5
    assert set(new) <= set(result.written) and gone not in set(result.written)


def test_a_large_affected_share_recomputes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    src, dst, weights = _random_graph(rng, 2_000, 8_000)
    state = IncrementalFastRP(FastRPParams(dim=16), np.arange(2_000), Edges(src, dst, weights))
    monkeypatch.setattr(fastrp_module, "FULL_RECOMPUTE_SHARE", 0.01)
    result = state.update(added=Edges(np.arange(50), np.arange(50, 100), np.ones(50)))
    assert result.mode == "full" and len(result.written) == 2_000


# --- change capture and incremental runs through Postgres --------------------------------------

SPEC = """
[[embeddings]]
name = "{name}"
table = "people"
key = "id"
modality = "graph"
dim = 32
index = "none"

[embeddings.graph]
edges = "knows"
weight_column = "strength"
feature_columns = ["age", "scores"]
property_ratio = 0.25
node_self_influence = 0.5
normalization_strength = -0.5
iteration_weights = [0.0, 1.0, 1.0]
"""


@pytest.fixture
def people(conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]) -> Path:
    """A generated weighted graph with node features, two identical specs over it, synced once."""
    rng = np.random.default_rng(11)
    n, m = 6_000, 7_000
    conn.execute("CREATE TABLE people (id bigint PRIMARY KEY, age real NOT NULL, scores real[] NOT NULL, note text)")
    conn.execute("CREATE TABLE knows (source bigint, target bigint, strength float8 NOT NULL, since int)")
    with conn.cursor().copy("COPY people (id, age, scores) FROM STDIN") as copy:
        for i in range(n):
            copy.write_row((i, float(rng.uniform(10, 80)), [float(x) for x in rng.normal(size=3)]))
    with conn.cursor().copy("COPY knows (source, target, strength, since) FROM STDIN") as copy:
        for a, b, w in zip(rng.integers(0, n, m), rng.integers(0, n, m), rng.uniform(0.5, 2, m), strict=True):
            copy.write_row((int(a), int(b), float(w), 2000))
    config = write_config(SPEC.format(name="live") + SPEC.format(name="fresh"))
    assert cli("migrate", config=config).code == 0
    result = cli("sync", "live", config=config)
    assert result.code == 0, result.err + result.out
    return config


def stored(conn: psycopg.Connection, table: str) -> dict[int, np.ndarray]:
    register_vector(conn)
    return {k: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v) for k, v in
            conn.execute(f"SELECT id, embedding FROM {table}").fetchall()}


def last_run(conn: psycopg.Connection, name: str) -> tuple[int, int, int, dict[str, Any]]:
    return conn.execute(
        "SELECT embedded, unchanged, deleted, details FROM vectorsync.runs WHERE embedding = %s "
        "ORDER BY id DESC LIMIT 1",
        (name,),
    ).fetchone()


def test_edge_and_node_changes_are_logged_and_notified(conn: psycopg.Connection, people: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN vectorsync")
        conn.execute("UPDATE knows SET since = 1999 WHERE source < 100")  # no endpoint or weight: nothing
        pending = "SELECT count(*) FROM vectorsync.graph_changes WHERE embedding = 'live'"
        assert conn.execute(pending).fetchone()[0] == 0
        conn.execute("UPDATE knows SET strength = 3.0 WHERE ctid = (SELECT min(ctid) FROM knows)")
        conn.execute("INSERT INTO knows VALUES (1, 2, 1.0, 2020)")
        conn.execute("UPDATE people SET note = 'x' WHERE id = 5")  # not an input column: nothing
        conn.execute("UPDATE people SET age = age + 1 WHERE id = 6")
        conn.execute("DELETE FROM people WHERE id = 7")
        notified = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
    kinds = conn.execute(
        "SELECT kind, source FROM vectorsync.graph_changes WHERE embedding = 'live' ORDER BY id"
    ).fetchall()
    assert [k for k, _ in kinds] == ["edge-", "edge+", "edge+", "node", "node"]
    assert [s for k, s in kinds if k == "node"] == ["6", "7"]
    assert notified and notified[0] in ("live", "fresh")


def test_incremental_sync_equals_a_full_run_and_writes_only_what_changed(
    conn: psycopg.Connection, people: Path, cli: Callable[..., Any]
) -> None:
    rng = np.random.default_rng(3)
    before = stored(conn, "live_embeddings")
    conn.execute("INSERT INTO knows SELECT a, b, 1.5, 2024 FROM unnest(%s::bigint[], %s::bigint[]) AS e(a, b)",
                 (rng.integers(0, 6000, 5).tolist(), rng.integers(0, 6000, 5).tolist()))
    conn.execute("DELETE FROM knows WHERE ctid IN (SELECT ctid FROM knows ORDER BY random() LIMIT 3)")
    conn.execute(
        "UPDATE knows SET strength = strength * 2 WHERE ctid IN (SELECT ctid FROM knows ORDER BY random() LIMIT 3)"
    )
    conn.execute("INSERT INTO people VALUES (9000, 33, '{1,2,3}')")
    conn.execute("INSERT INTO knows VALUES (9000, 12, 1.0, 2025), (40, 9000, 2.0, 2025)")
    conn.execute("DELETE FROM people WHERE id = 99")
    conn.execute("UPDATE people SET scores = '{0,0,1}' WHERE id = 123")
    result = cli("sync", "live", config=people)
    assert result.code == 0, result.err + result.out
    embedded, unchanged, deleted, details = last_run(conn, "live")
    assert details["mode"] == "incremental" and details["changes"] > 0
    assert deleted == 1 and 0 < embedded < 1000 and embedded + unchanged == 6000
    assert conn.execute("SELECT count(*) FROM vectorsync.graph_changes WHERE embedding = 'live'").fetchone()[0] == 0

    graph_fastrp._CACHE.pop("fresh", None)
    assert cli("sync", "fresh", config=people).code == 0
    assert last_run(conn, "fresh")[3]["mode"] == "full"
    live, fresh = stored(conn, "live_embeddings"), stored(conn, "fresh_embeddings")
    assert live.keys() == fresh.keys() and 99 not in live and 9000 in live
    assert max(np.abs(live[k] - fresh[k]).max() for k in live) <= 1e-5
    moved = [k for k in before if k in live and not np.array_equal(before[k], live[k])]
    assert 0 < len(moved) <= embedded


def test_a_sync_with_nothing_changed_does_no_graph_work(
    conn: psycopg.Connection, people: Path, cli: Callable[..., Any]
) -> None:
    graph_fastrp._CACHE.clear()  # a fresh process: without a change there is still nothing to read
    result = cli("sync", "live", config=people)
    assert result.code == 0, result.err
    embedded, unchanged, deleted, details = last_run(conn, "live")
    assert (embedded, unchanged, deleted) == (0, 6000, 0)
    assert details["mode"] == "unchanged" and "read_seconds" not in details
    conn.execute("INSERT INTO knows VALUES (1, 2, 1.0, 2020)")
    assert cli("sync", "live", config=people).code == 0
    assert last_run(conn, "live")[3]["mode"] == "full"  # no state in this process: read it all once


def test_truncating_the_edges_recomputes_from_scratch(
    conn: psycopg.Connection, people: Path, cli: Callable[..., Any]
) -> None:
    conn.execute("TRUNCATE knows")
    assert cli("sync", "live", config=people).code == 0
    details = last_run(conn, "live")[3]
    assert details["mode"] == "full" and details["edges"] == 0


def test_an_application_role_writes_edges_without_rights_on_vectorsync(
    conn: psycopg.Connection, people: Path
) -> None:
    conn.execute("CREATE ROLE graph_app_role LOGIN")
    conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON knows, people TO graph_app_role")
    conn.execute("SET ROLE graph_app_role")
    try:
        conn.execute("INSERT INTO knows VALUES (3, 4, 1.0, 2021)")
        conn.execute("UPDATE people SET age = 1 WHERE id = 3")
    finally:
        conn.execute("RESET ROLE")
    assert conn.execute("SELECT count(*) FROM vectorsync.graph_changes WHERE embedding = 'live'").fetchone()[0] == 2


def test_the_worker_applies_an_edge_change_incrementally(
    conn: psycopg.Connection, people: Path, db_url: str
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "VECTORSYNC_DATABASE_URL": db_url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "--config", str(people), "worker", "live"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
    )

    def runs_of(mode: str) -> int:
        return conn.execute(
            "SELECT count(*) FROM vectorsync.runs WHERE embedding = 'live' AND details->>'mode' = %s", (mode,)
        ).fetchone()[0]

    try:
        conn.execute("INSERT INTO knows VALUES (10, 11, 1.0, 2020)")  # the worker's first run reads it all
        deadline = time.monotonic() + 90
        while runs_of("full") < 2 and time.monotonic() < deadline:
            assert worker.poll() is None, worker.stdout.read().decode() if worker.stdout else ""
            time.sleep(0.2)
        conn.execute("INSERT INTO knows VALUES (12, 13, 1.0, 2020)")
        while runs_of("incremental") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runs_of("incremental") == 1, "the worker did not apply the change incrementally"
        pending = "SELECT count(*) FROM vectorsync.graph_changes WHERE embedding = 'live'"
        assert conn.execute(pending).fetchone()[0] == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
