"""Graph embeddings end to end: native FastRP over Cora held in Postgres, and the Neo4j bridge from a
real Bolt server (ArcadeDB always, Neo4j GDS when NEO4J_URI is set) into pgvector."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from tests.conftest import BoltServer
from vectorsync.sync import graph_fastrp

CORA_FOLDER = "resources/cora"


# --- Cora in Postgres --------------------------------------------------------------------------


def cora_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    graphdatascience = pytest.importorskip("graphdatascience")
    folder = Path(graphdatascience.__file__).parent / CORA_FOLDER
    return (
        pd.read_parquet(folder / "cora_nodes.parquet.gzip"),
        pd.read_parquet(folder / "cora_rels.parquet.gzip"),
    )


@functools.cache
def cora_copy_data() -> tuple[bytes, bytes, pd.DataFrame]:
    """COPY text payloads of ``papers`` (id, subject, features) and ``cites``, built once."""
    nodes, rels = cora_frames()
    features = ["{" + ",".join(map(str, row)) + "}" for row in nodes["features"]]
    papers = "".join(f"{k}\t{s}\t{f}\n" for k, s, f in zip(nodes["nodeId"], nodes["subject"], features, strict=True))
    cites = "".join(f"{a}\t{b}\n" for a, b in zip(rels["sourceNodeId"], rels["targetNodeId"], strict=True))
    return papers.encode(), cites.encode(), nodes


def load_cora(conn: psycopg.Connection, papers: str = "papers", *, shuffle: int | None = None) -> pd.DataFrame:
    """``papers(id bigint, subject int, features real[1433])`` and ``cites(source, target)``."""
    data, cites, nodes = cora_copy_data()
    if shuffle is not None:
        lines = data.splitlines(keepends=True)
        order = np.random.default_rng(shuffle).permutation(len(lines))
        data = b"".join(lines[i] for i in order)
    conn.execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, subject integer NOT NULL, features real[])").format(
            sql.Identifier(papers)
        )
    )
    with conn.cursor().copy(sql.SQL("COPY {} (id, subject, features) FROM STDIN").format(sql.Identifier(papers))) as cp:
        cp.write(data)
    if conn.execute("SELECT to_regclass('cites')").fetchone()[0] is None:
        conn.execute("CREATE TABLE cites (source bigint NOT NULL, target bigint NOT NULL)")
        with conn.cursor().copy("COPY cites (source, target) FROM STDIN") as cp:
            cp.write(cites)
    return nodes


def graph_spec(name: str, table: str = "papers", dim: int = 128, **graph: Any) -> str:
    fields = {"edges": "cites", "source_column": "source", "target_column": "target", **graph}
    lines = "\n".join(f"{k} = {_toml(v)}" for k, v in fields.items())
    return f"""
[[embeddings]]
name = "{name}"
table = "{table}"
key = "id"
modality = "graph"
dim = {dim}
index = "none"

[embeddings.graph]
{lines}
"""


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


STRUCTURE = graph_spec("cora", iteration_weights=[0.0, 1.0, 1.0, 1.0], normalization_strength=-0.5)
FEATURES = graph_spec(
    "cora_features",
    dim=256,
    feature_columns=["features"],
    property_ratio=0.5,
    iteration_weights=[0.0, 1.0, 1.0, 1.0],
    node_self_influence=1.0,
    normalization_strength=-0.5,
)


def vectors(conn: psycopg.Connection, target: str, key: str = "id") -> dict[Any, np.ndarray]:
    register_vector(conn)
    query = sql.SQL("SELECT {}, embedding FROM {}").format(sql.Identifier(key), sql.Identifier(target))
    return {k: as_array(v) for k, v in conn.execute(query).fetchall()}


def as_array(value: Any) -> np.ndarray:
    """pgvector's loader gives a ``Vector`` (binary results) or a numpy array (text results)."""
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)


def embedded_at(conn: psycopg.Connection, target: str, key: str = "id") -> dict[Any, Any]:
    query = sql.SQL("SELECT {}, embedded_at FROM {}").format(sql.Identifier(key), sql.Identifier(target))
    return dict(conn.execute(query).fetchall())


def logistic_accuracy(conn: psycopg.Connection, target: str) -> float:
    """Logistic regression on half the stored vectors, accuracy on the other half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    register_vector(conn)
    rows = conn.execute(
        sql.SQL("SELECT p.subject, e.embedding FROM papers p JOIN {} e USING (id) ORDER BY p.id").format(
            sql.Identifier(target)
        )
    ).fetchall()
    labels = np.array([r[0] for r in rows])
    matrix = np.stack([as_array(r[1]) for r in rows])
    x_train, x_test, y_train, y_test = train_test_split(matrix, labels, test_size=0.5, random_state=0, stratify=labels)
    model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return float(model.score(x_test, y_test))


def knn_accuracy(conn: psycopg.Connection, name: str, sample: int = 200, k: int = 10) -> float:
    """Majority subject of the k nearest neighbours from ``vectorsync.nearest``, for sampled papers."""
    subjects = dict(conn.execute("SELECT id::text, subject FROM papers").fetchall())
    keys = np.random.default_rng(0).choice(sorted(subjects), size=sample, replace=False)
    hits = 0
    for key in keys:
        rows = conn.execute("SELECT key FROM vectorsync.nearest(%s, %s, %s)", (name, str(key), k)).fetchall()
        votes = np.bincount([subjects[r[0]] for r in rows], minlength=7)
        hits += int(votes.argmax() == subjects[key])
    return hits / sample


def runs(conn: psycopg.Connection, name: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT id, kind, embedded, unchanged, deleted, details, finished_at IS NOT NULL FROM vectorsync.runs "
        "WHERE embedding = %s ORDER BY id",
        (name,),
    ).fetchall()


def counts_line(out: str, name: str) -> dict[str, int]:
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith(f"{name}: "))
    return {k: int(v) for k, v in (part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))}


@pytest.fixture
def cora(conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]) -> Path:
    """Cora loaded, both native specs migrated and synced once."""
    load_cora(conn)
    config = write_config(STRUCTURE + FEATURES)
    assert cli("migrate", config=config).code == 0
    result = cli("sync", config=config)
    assert result.code == 0, result.err + result.out
    return config


# --- native FastRP -----------------------------------------------------------------------------


def test_native_fastrp_on_cora_predicts_subjects_far_above_chance(conn: psycopg.Connection, cora: Path) -> None:
    chance = conn.execute(
        "SELECT max(c)::float / sum(c) FROM (SELECT count(*) AS c FROM papers GROUP BY subject) s"
    ).fetchone()[0]
    structure = logistic_accuracy(conn, "cora_embeddings"), knn_accuracy(conn, "cora")
    features = logistic_accuracy(conn, "cora_features_embeddings"), knn_accuracy(conn, "cora_features")
    print(
        f"\nCora subject accuracy from pgvector (majority class {chance:.3f}): "
        f"structure-only logistic {structure[0]:.3f}, 10-NN {structure[1]:.3f}; "
        f"with features logistic {features[0]:.3f}, 10-NN {features[1]:.3f}"
    )
    assert conn.execute("SELECT count(*) FROM cora_embeddings").fetchone()[0] == 2708
    assert min(structure) > chance + 0.35
    assert min(features) > chance + 0.35


def test_sync_records_a_fastrp_run_and_a_model_version(conn: psycopg.Connection, cora: Path) -> None:
    (_, kind, embedded, unchanged, deleted, details, finished), = runs(conn, "cora")
    assert (kind, embedded, unchanged, deleted, finished) == ("fastrp", 2708, 0, 0, True)
    assert details["nodes"] == 2708 and details["edges"] == 5429 and details["skipped_edges"] == 0
    version, last_sync = conn.execute(
        "SELECT current_version, last_sync FROM vectorsync.embeddings WHERE name = 'cora'"
    ).fetchone()
    assert last_sync is not None
    stamped = conn.execute("SELECT count(*) FROM cora_embeddings WHERE model_version = %s", (version,)).fetchone()[0]
    assert stamped == 2708
    encoder, params = conn.execute(
        "SELECT encoder_type, params FROM vectorsync.models WHERE embedding = 'cora' AND version = %s", (version,)
    ).fetchone()
    assert encoder == "fastrp" and params["iteration_weights"] == [0.0, 1.0, 1.0, 1.0]


def test_second_sync_writes_nothing_and_counts_unchanged(
    conn: psycopg.Connection, cora: Path, cli: Callable[..., Any]
) -> None:
    before = embedded_at(conn, "cora_embeddings")
    result = cli("sync", "cora", config=cora)
    assert result.code == 0, result.err
    counts = counts_line(result.out + result.err, "cora")
    assert (counts["embedded"], counts["unchanged"], counts["deleted"]) == (0, 2708, 0)
    assert embedded_at(conn, "cora_embeddings") == before
    assert [r[2:5] for r in runs(conn, "cora")] == [(2708, 0, 0), (0, 2708, 0)]
    assert counts["run_id"] == runs(conn, "cora")[-1][0]


def test_deleting_a_node_removes_its_vector_and_skips_its_dangling_edges(
    conn: psycopg.Connection, cora: Path, cli: Callable[..., Any]
) -> None:
    hub = conn.execute("SELECT source FROM cites GROUP BY source ORDER BY count(*) DESC, source LIMIT 1").fetchone()[0]
    degree = conn.execute("SELECT count(*) FROM cites WHERE source = %s OR target = %s", (hub, hub)).fetchone()[0]
    conn.execute("DELETE FROM papers WHERE id = %s", (hub,))  # its edges stay behind in cites
    graph_fastrp._CACHE.clear()  # a fresh process: the run reads the whole graph and counts what it skips
    result = cli("sync", "cora", config=cora)
    assert result.code == 0, result.err
    counts = counts_line(result.out + result.err, "cora")
    assert counts["deleted"] == 1 and counts["skipped_edges"] == degree
    assert 0 < counts["embedded"] < 2707 and counts["embedded"] + counts["unchanged"] == 2707
    assert conn.execute("SELECT count(*) FROM cora_embeddings WHERE id = %s", (hub,)).fetchone()[0] == 0


def test_vectors_depend_on_the_keys_not_on_row_order_or_run(
    conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    load_cora(conn, "papers")
    load_cora(conn, "papers_shuffled", shuffle=7)
    config = write_config(STRUCTURE + graph_spec("shuffled", table="papers_shuffled",
                                                 iteration_weights=[0.0, 1.0, 1.0, 1.0], normalization_strength=-0.5))
    assert cli("migrate", config=config).code == 0
    assert cli("sync", config=config).code == 0
    first = vectors(conn, "cora_embeddings")
    conn.execute("DELETE FROM cora_embeddings")
    assert cli("sync", "cora", config=config).code == 0
    again, shuffled = vectors(conn, "cora_embeddings"), vectors(conn, "shuffled_embeddings")
    assert first.keys() == again.keys() == shuffled.keys()
    for key, vector in first.items():
        np.testing.assert_array_equal(vector, again[key])
        np.testing.assert_array_equal(vector, shuffled[key])


def test_changing_a_parameter_registers_a_new_model_version_and_rewrites_all(
    conn: psycopg.Connection, cora: Path, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    config = write_config(graph_spec("cora", iteration_weights=[0.0, 1.0, 1.0], normalization_strength=-0.5))
    result = cli("sync", "cora", config=config)
    assert result.code == 0, result.err
    assert counts_line(result.out + result.err, "cora")["embedded"] == 2708
    assert conn.execute("SELECT current_version FROM vectorsync.embeddings WHERE name = 'cora'").fetchone()[0] == 2
    config = write_config(STRUCTURE)  # back to the first parameters: their version is reused
    result = cli("sync", "cora", config=config)
    assert counts_line(result.out + result.err, "cora")["model_version"] == 1


def test_edges_that_match_no_node_are_a_clear_error(
    conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    load_cora(conn)
    conn.execute("CREATE TABLE wrong_cites AS SELECT source + 100000000 AS source, target FROM cites")
    config = write_config(graph_spec("cora", edges="wrong_cites"))
    assert cli("migrate", config=config).code == 0
    result = cli("sync", config=config)
    assert result.code == 1
    assert "none of the 5429 edges connects two nodes ('source' value '100000035' in edge table 'wrong_cites'" in (
        result.out + result.err
    )
    assert "Traceback" not in result.out + result.err


def test_nan_weight_names_the_edge_and_column(
    conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    load_cora(conn)
    conn.execute("ALTER TABLE cites ADD COLUMN strength double precision NOT NULL DEFAULT 1.0")
    conn.execute("UPDATE cites SET strength = 'NaN' WHERE source = 35 AND target = 1033")
    config = write_config(graph_spec("cora", weight_column="strength"))
    assert cli("migrate", config=config).code == 0
    result = cli("sync", config=config)
    assert result.code == 1
    assert "edge 35 -> 1033 in table 'cites' has weight NULL or NaN in column 'strength'" in result.out + result.err


def test_nan_feature_names_the_node_and_column(
    conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    load_cora(conn)
    conn.execute("UPDATE papers SET features[3] = 'NaN' WHERE id = 31336")
    config = write_config(FEATURES)
    assert cli("migrate", config=config).code == 0
    result = cli("sync", config=config)
    assert result.code == 1
    assert "node 31336 has a NULL, NaN or infinite value in feature column 'features'" in result.out + result.err


# --- Neo4j bridge (ArcadeDB) -------------------------------------------------------------------


def load_karate(bolt: BoltServer, label: str, **props: list[Any]) -> list[str]:
    """Zachary's karate club as ``label`` nodes with keys "m0".."m33"."""
    import networkx as nx

    graph = nx.karate_club_graph()
    keys = [f"m{i}" for i in graph.nodes()]
    rows = [{"key": k, **{p: v[i] for p, v in props.items()}} for i, k in enumerate(keys)]
    bolt.run(f"UNWIND $rows AS r CREATE (n:{label}) SET n = r", rows=rows)
    edges = [{"a": f"m{a}", "b": f"m{b}"} for a, b in graph.edges()]
    bolt.run(f"UNWIND $rows AS r MATCH (a:{label} {{key: r.a}}) MATCH (b:{label} {{key: r.b}}) "
             "CREATE (a)-[:KNOWS]->(b)", rows=edges)
    return keys


def bridge_spec(bolt: BoltServer, name: str, label: str, dim: int, source: str, **neo4j: Any) -> str:
    fields = {"uri": bolt.uri, "user": bolt.user, "password_env": bolt.password_env, "database": bolt.database,
              "label": label, "key_property": "key", **neo4j}
    lines = "\n".join(f"{k} = {_toml(v)}" for k, v in fields.items() if k != "config")
    config = neo4j.get("config")
    table = ("\nconfig = { " + ", ".join(f"{k} = {_toml(v)}" for k, v in config.items()) + " }") if config else ""
    return f"""
[[embeddings]]
name = "{name}"
table = "members"
key = "key"
modality = "graph"
dim = {dim}
{source}

[embeddings.neo4j]
{lines}{table}
"""


@pytest.fixture
def members(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE members (key text PRIMARY KEY)")
    conn.execute("INSERT INTO members SELECT 'm' || i FROM generate_series(0, 33) i")
    return conn


def unique_label(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def test_bridge_copies_arcadedb_fastrp_vectors_queryable_from_sql(
    arcadedb: BoltServer, members: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    label = unique_label("Member")
    load_karate(arcadedb, label)
    config = write_config(bridge_spec(arcadedb, "karate", label, 16, "", algorithm="fastRP",
                                      config={"randomSeed": 7}, page_size=10))
    assert cli("migrate", config=config).code == 0
    result = cli("sync", "karate", config=config)
    assert result.code == 0, result.err + result.out
    counts = counts_line(result.out + result.err, "karate")
    assert (counts["embedded"], counts["deleted"]) == (34, 0)
    nearest = members.execute("SELECT key, distance FROM vectorsync.nearest('karate', 'm0', 5)").fetchall()
    assert len(nearest) == 5 and all(k.startswith("m") and k != "m0" for k, _ in nearest)
    (_, kind, embedded, _, _, details, finished), = runs(members, "karate")
    assert (kind, embedded, finished) == ("bridge", 34, True)
    assert details["dialect"] == "arcadedb" and details["pages"] == 4 and details["source"] == "algorithm fastRP"


def test_bridge_stored_property_sync_is_exact_incremental_and_drops_vanished_nodes(
    arcadedb: BoltServer, members: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    label = unique_label("Stored")
    stored = np.random.default_rng(3).normal(size=(34, 8))
    keys = load_karate(arcadedb, label, emb=stored.tolist())
    config = write_config(bridge_spec(arcadedb, "stored", label, 8, "", property="emb"))
    assert cli("migrate", config=config).code == 0
    assert cli("sync", config=config).code == 0
    copied = vectors(members, "stored_embeddings", "key")
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(copied[key], stored[i].astype(np.float32))
    before = embedded_at(members, "stored_embeddings", "key")

    arcadedb.run(f"MATCH (n:{label}) WHERE n.key = 'm5' SET n.emb = $v", v=[1.0] * 8)
    arcadedb.run(f"MATCH (n:{label}) WHERE n.key IN ['m1', 'm2'] DETACH DELETE n")
    result = cli("sync", "stored", config=config)
    assert result.code == 0, result.err
    counts = counts_line(result.out + result.err, "stored")
    assert (counts["embedded"], counts["unchanged"], counts["deleted"]) == (1, 31, 2)
    after = embedded_at(members, "stored_embeddings", "key")
    assert sorted(set(before) - set(after)) == ["m1", "m2"]
    assert [k for k in after if after[k] != before[k]] == ["m5"]
    np.testing.assert_array_equal(vectors(members, "stored_embeddings", "key")["m5"], np.ones(8, dtype=np.float32))
    assert [r[1:5] for r in runs(members, "stored")] == [("bridge", 34, 0, 0), ("bridge", 1, 31, 2)]


def test_bridge_skips_a_run_when_the_neo4j_graph_did_not_change(
    arcadedb: BoltServer, members: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    label = unique_label("Finger")
    load_karate(arcadedb, label)
    config = write_config(bridge_spec(arcadedb, "finger", label, 16, "", algorithm="fastRP", config={"randomSeed": 7}))
    assert cli("migrate", config=config).code == 0
    assert cli("sync", "finger", config=config).code == 0
    before = embedded_at(members, "finger_embeddings", "key")

    result = cli("sync", "finger", config=config)
    assert result.code == 0, result.err
    counts = counts_line(result.out + result.err, "finger")
    assert (counts["embedded"], counts["unchanged"], counts["deleted"]) == (0, 34, 0)
    details = runs(members, "finger")[-1][5]
    assert details["mode"] == "unchanged" and "did not change" in details["reason"]
    assert details["fingerprint"]["nodes"] == 34 and details["fingerprint"]["relationships"] == 2 * 78
    assert embedded_at(members, "finger_embeddings", "key") == before

    members.execute("INSERT INTO members VALUES ('m34')")
    arcadedb.run(f"CREATE (n:{label} {{key: 'm34'}})")
    arcadedb.run(f"MATCH (a:{label} {{key: 'm0'}}) MATCH (b:{label} {{key: 'm34'}}) CREATE (a)-[:KNOWS]->(b)")
    result = cli("sync", "finger", config=config)
    assert result.code == 0, result.err
    assert runs(members, "finger")[-1][5]["mode"] == "full"
    assert members.execute("SELECT count(*) FROM finger_embeddings").fetchone()[0] == 35


def test_bridge_errors_are_one_cli_line(
    arcadedb: BoltServer,
    members: psycopg.Connection,
    write_config: Callable[[str], Path],
    cli: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vectorsync.sync import neo4j_bridge

    monkeypatch.setattr(neo4j_bridge, "BACKOFF_SECONDS", 0.01)
    label = unique_label("Errors")
    load_karate(arcadedb, label, emb=np.zeros((34, 8)).tolist())
    monkeypatch.setenv("VECTORSYNC_TEST_WRONG_PASSWORD", "not-the-password")
    cases = {
        "authentication failed for user 'root'": bridge_spec(
            arcadedb, "wrong", label, 8, "", property="emb", password_env="VECTORSYNC_TEST_WRONG_PASSWORD"
        ),
        "cannot reach the graph server at bolt://127.0.0.1:9": bridge_spec(
            arcadedb, "wrong", label, 8, "", property="emb", uri="bolt://127.0.0.1:9"
        ),
        "'emb' vectors have dimension 8 but the spec's dim is 16": bridge_spec(arcadedb, "wrong", label, 16, "",
                                                                               property="emb"),
    }
    for expected, body in cases.items():
        config = write_config(body)
        assert cli("migrate", "--recreate", "wrong", config=config).code == 0
        result = cli("sync", "wrong", config=config)
        output = result.out + result.err
        assert result.code == 1, output
        assert expected in output and "Traceback" not in output
        assert len([ln for ln in output.splitlines() if "error:" in ln]) == 1
    failed = members.execute(
        "SELECT details->>'error' FROM vectorsync.runs WHERE embedding = 'wrong' ORDER BY id DESC LIMIT 1"
    ).fetchone()[0]
    assert "dimension 8" in failed


def test_worker_reruns_the_bridge_on_its_schedule(
    arcadedb: BoltServer, members: psycopg.Connection, db_url: str, write_config: Callable[[str], Path],
    cli: Callable[..., Any],
) -> None:
    """A stored-vector bridge is copied on every scheduled run; an algorithm bridge's scheduled runs
    do no work while the graph's fingerprint holds, and run in full once it changes."""
    label = unique_label("Sched")
    load_karate(arcadedb, label, emb=np.zeros((34, 4)).tolist())
    config = write_config(
        bridge_spec(arcadedb, "scheduled", label, 4, "schedule_seconds = 1", property="emb")
        + bridge_spec(arcadedb, "sched_fastrp", label, 8, "schedule_seconds = 1", algorithm="fastRP",
                      config={"randomSeed": 3})
    )
    assert cli("migrate", config=config).code == 0
    env = {**os.environ, "VECTORSYNC_DATABASE_URL": db_url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "--config", str(config), "worker"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
    )
    try:
        first = wait_for(worker, members, "SELECT count(*) = 34 FROM scheduled_embeddings")
        assert first, "the worker's first scheduled run did not arrive"
        arcadedb.run(f"MATCH (n:{label}) WHERE n.key = 'm7' SET n.emb = [0.5, 0.25, 0.125, 1.0]")
        changed = wait_for(
            worker, members, "SELECT embedding::text = '[0.5,0.25,0.125,1]' FROM scheduled_embeddings WHERE key = 'm7'"
        )
        assert changed, "the changed vector did not arrive"
        bridge_runs = members.execute(
            "SELECT count(*) FROM vectorsync.runs WHERE embedding = 'scheduled' AND kind = 'bridge' "
            "AND finished_at IS NOT NULL"
        ).fetchone()[0]
        assert bridge_runs >= 2

        assert wait_for(worker, members, "SELECT count(*) = 34 FROM sched_fastrp_embeddings")
        stamped = embedded_at(members, "sched_fastrp_embeddings", "key")
        assert wait_for(worker, members, "SELECT count(*) >= 2 FROM vectorsync.runs WHERE embedding = 'sched_fastrp' "
                        "AND details->>'mode' = 'unchanged'"), "no scheduled run found the graph unchanged"
        assert embedded_at(members, "sched_fastrp_embeddings", "key") == stamped
        last = members.execute("SELECT max(id) FROM vectorsync.runs").fetchone()[0]
        arcadedb.run(f"MATCH (a:{label} {{key: 'm0'}}) MATCH (b:{label} {{key: 'm33'}}) CREATE (a)-[:KNOWS]->(b)")
        assert wait_for(worker, members, "SELECT count(*) = 1 FROM vectorsync.runs WHERE embedding = 'sched_fastrp' "
                        f"AND details->>'mode' = 'full' AND id > {last}"), "the changed graph was not run again"
        modes = [r[0] for r in members.execute(
            "SELECT details->>'mode' FROM vectorsync.runs WHERE embedding = 'sched_fastrp' AND finished_at IS NOT NULL "
            "ORDER BY id"
        )]
        assert modes[0] == "full" and modes.count("full") == 2, modes
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def wait_for(worker: subprocess.Popen[bytes], conn: psycopg.Connection, query: str, timeout: float = 90) -> bool:
    """Poll ``query`` (one boolean) until it is true, the worker exits, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            output = worker.stdout.read().decode(errors="replace") if worker.stdout else ""
            raise AssertionError(f"the worker exited with {worker.returncode}:\n{output[-3000:]}")
        row = conn.execute(query).fetchone()
        if row and row[0]:
            return True
        time.sleep(0.25)
    return False


# --- Neo4j GDS (only with NEO4J_URI) -----------------------------------------------------------


def test_bridge_from_neo4j_gds_fastrp(
    conn: psycopg.Connection, members: psycopg.Connection, write_config: Callable[[str], Path],
    cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = os.environ.get("NEO4J_URI")
    if not uri:
        pytest.skip("set NEO4J_URI (and NEO4J_USER, NEO4J_PASSWORD) to test against Neo4j GDS")
    bolt = BoltServer(uri, os.environ.get("NEO4J_USER", "neo4j"), os.environ.get("NEO4J_PASSWORD", ""), None,
                      password_env="NEO4J_PASSWORD")
    monkeypatch.setenv("NEO4J_PASSWORD", bolt.password)
    label = unique_label("VsGraphSync")
    load_karate(bolt, label)
    try:
        config = write_config(bridge_spec(bolt, "gds", label, 16, "", algorithm="fastRP", config={"randomSeed": 1}))
        assert cli("migrate", config=config).code == 0
        result = cli("sync", "gds", config=config)
        assert result.code == 0, result.err
        assert counts_line(result.out + result.err, "gds")["embedded"] == 34
        assert runs(members, "gds")[-1][5]["dialect"] == "neo4j-gds"
    finally:
        bolt.run(f"MATCH (n:{label}) DETACH DELETE n")
