"""The Neo4j bridge against a real Bolt server: ArcadeDB (always), Neo4j GDS (when NEO4J_URI is set)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from tests.bolt_server import start_arcadedb
from vectorsync.encoders.fastrp import fastrp
from vectorsync.sync import neo4j_bridge
from vectorsync.sync.neo4j_bridge import BridgeError, detect_dialect, stream_embeddings
from vectorsync.sync.spec import Neo4jSpec

neo4j = pytest.importorskip("neo4j")

PASSWORD_ENV = "VECTORSYNC_TEST_BOLT_PASSWORD"


@dataclass(frozen=True)
class Bolt:
    uri: str
    user: str
    password: str
    database: str | None

    def spec(self, **fields: Any) -> Neo4jSpec:
        base: dict[str, Any] = {
            "uri": self.uri,
            "user": self.user,
            "password_env": PASSWORD_ENV,
            "database": self.database,
        }
        return Neo4jSpec(**{**base, **fields})

    def run(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with (
            neo4j.GraphDatabase.driver(self.uri, auth=(self.user, self.password)) as driver,
            driver.session(database=self.database) as session,
        ):
            return [record.data() for record in session.run(query, params)]


def _load(bolt: Bolt, label: str, keys: list[Any], edges: list[tuple[int, int]], **node_props: list[Any]) -> list[str]:
    """Create one node per key (batched UNWIND) and the edges between positions; return elementIds."""
    element_ids: list[str] = []
    for start in range(0, len(keys), 2000):
        rows = [
            {"key": keys[i], **{name: values[i] for name, values in node_props.items()}}
            for i in range(start, min(start + 2000, len(keys)))
        ]
        created = bolt.run(f"UNWIND $rows AS r CREATE (n:{label}) SET n = r RETURN elementId(n) AS id", rows=rows)
        element_ids += [row["id"] for row in created]
    for start in range(0, len(edges), 2000):
        rows = [{"a": element_ids[a], "b": element_ids[b]} for a, b in edges[start : start + 2000]]
        bolt.run(
            "UNWIND $rows AS r MATCH (a) WHERE elementId(a) = r.a MATCH (b) WHERE elementId(b) = r.b "
            "CREATE (a)-[:LINKS]->(b)",
            rows=rows,
        )
    return element_ids


@dataclass(frozen=True)
class Loaded:
    bolt: Bolt
    karate_edges: list[tuple[int, int]]
    cora_keys: np.ndarray
    cora_src: np.ndarray
    cora_dst: np.ndarray
    cora_vectors: np.ndarray


@pytest.fixture(scope="session")
def arcadedb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bolt]:
    with start_arcadedb(tmp_path_factory.mktemp("bolt")) as (uri, user, password, database):
        os.environ[PASSWORD_ENV] = password
        yield Bolt(uri, user, password, database)
        os.environ.pop(PASSWORD_ENV, None)


@pytest.fixture(scope="session")
def loaded(arcadedb: Bolt) -> Loaded:
    """Karate club as :Member (keys "m0".."m33"), Cora as :Paper with a stored FastRP vector `emb`."""
    karate = nx.karate_club_graph()
    karate_edges = [(int(a), int(b)) for a, b in karate.edges()]
    _load(arcadedb, "Member", [f"m{i}" for i in karate.nodes()], karate_edges)

    graphdatascience = pytest.importorskip("graphdatascience")
    folder = os.path.join(os.path.dirname(graphdatascience.__file__), "resources", "cora")
    nodes = pd.read_parquet(os.path.join(folder, "cora_nodes.parquet.gzip"))
    rels = pd.read_parquet(os.path.join(folder, "cora_rels.parquet.gzip"))
    keys = nodes["nodeId"].to_numpy(np.int64)
    position = pd.Series(np.arange(len(keys)), index=keys)
    src = position[rels["sourceNodeId"]].to_numpy()
    dst = position[rels["targetNodeId"]].to_numpy()
    vectors = fastrp(len(keys), src, dst, dim=64, node_ids=keys)
    _load(
        arcadedb,
        "Paper",
        keys.tolist(),
        list(zip(src.tolist(), dst.tolist(), strict=True)),
        emb=vectors.astype(np.float64).tolist(),
    )
    return Loaded(arcadedb, karate_edges, keys, src, dst, vectors)


def _collect(spec: Neo4jSpec, dim: int) -> tuple[list[Any], np.ndarray, list[int]]:
    keys: list[Any] = []
    pages: list[np.ndarray] = []
    for page_keys, page in stream_embeddings(spec, dim):
        keys += page_keys
        pages.append(page)
    return keys, np.concatenate(pages), [len(p) for p in pages]


def _edge_vs_random_similarity(vectors: np.ndarray, src: np.ndarray, dst: np.ndarray) -> tuple[float, float]:
    unit = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(vectors), (2, 5000))
    return float((unit[src] * unit[dst]).sum(1).mean()), float((unit[a] * unit[b]).sum(1).mean())


def test_dialect_is_detected_from_the_agent_string(arcadedb: Bolt) -> None:
    with neo4j.GraphDatabase.driver(arcadedb.uri, auth=(arcadedb.user, arcadedb.password)) as driver:
        driver.verify_connectivity()
        assert detect_dialect(driver) == "arcadedb"


def test_fastrp_on_arcadedb_streams_every_labelled_node_once_in_pages(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(
        label="Member", key_property="key", algorithm="fastRP", config={"randomSeed": 7}, page_size=10
    )
    keys, vectors, sizes = _collect(spec, 32)
    assert sorted(keys) == sorted(f"m{i}" for i in range(34))  # no :Paper node slipped in
    assert vectors.dtype == np.float32 and vectors.shape == (34, 32)
    assert sizes == [10, 10, 10, 4]
    assert np.isfinite(vectors).all() and (np.linalg.norm(vectors, axis=1) > 0).all()


def test_fastrp_on_arcadedb_puts_connected_nodes_closer_than_random_pairs(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Paper", key_property="key", algorithm="fastRP", config={"randomSeed": 1})
    start = time.perf_counter()
    keys, vectors, _ = _collect(spec, 128)
    elapsed = time.perf_counter() - start
    print(
        f"ArcadeDB algo.fastrp + stream of {len(keys)} Cora nodes: {elapsed:.2f}s ({len(keys) / elapsed:.0f} nodes/s)"
    )
    order = pd.Series(np.arange(len(keys)), index=keys)[loaded.cora_keys].to_numpy()
    edges, random_pairs = _edge_vs_random_similarity(vectors[order], loaded.cora_src, loaded.cora_dst)
    print(f"mean cosine: cited pairs {edges:.3f}, random pairs {random_pairs:.3f}")
    assert len(keys) == len(loaded.cora_keys)
    assert edges > random_pairs + 0.2


@pytest.mark.parametrize(("algorithm", "config"), [("graphSage", {"randomSeed": 3}), ("node2vec", {"walkLength": 10})])
def test_other_arcadedb_algorithms_stream_vectors_of_the_spec_dim(
    loaded: Loaded, algorithm: str, config: dict[str, Any]
) -> None:
    spec = loaded.bolt.spec(label="Member", key_property="key", algorithm=algorithm, config=config)
    keys, vectors, _ = _collect(spec, 16)
    assert len(keys) == 34 and vectors.shape == (34, 16)


def test_stored_property_is_read_back_exactly(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Paper", key_property="key", property="emb", page_size=1000)
    start = time.perf_counter()
    keys, vectors, sizes = _collect(spec, 64)
    elapsed = time.perf_counter() - start
    print(f"Bolt read of stored vectors: {len(keys)} nodes in {elapsed:.2f}s ({len(keys) / elapsed:.0f} nodes/s)")
    assert sizes == [1000, 1000, 708]
    order = pd.Series(np.arange(len(keys)), index=keys)[loaded.cora_keys].to_numpy()
    np.testing.assert_array_equal(vectors[order], loaded.cora_vectors)


def test_wrong_password_is_reported_as_an_authentication_failure(
    arcadedb: Bolt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VECTORSYNC_WRONG_PASSWORD", "not-the-password")
    spec = arcadedb.spec(label="Member", key_property="key", property="emb", password_env="VECTORSYNC_WRONG_PASSWORD")
    with pytest.raises(BridgeError, match="authentication failed for user 'root'"):
        list(stream_embeddings(spec, 8))


def test_missing_password_variable_is_named(arcadedb: Bolt) -> None:
    spec = arcadedb.spec(label="Member", key_property="key", property="emb", password_env="VECTORSYNC_UNSET_VARIABLE")
    with pytest.raises(BridgeError, match="VECTORSYNC_UNSET_VARIABLE"):
        list(stream_embeddings(spec, 8))


def test_unreachable_server_fails_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neo4j_bridge, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setenv(PASSWORD_ENV, "x")
    spec = Neo4jSpec(uri="bolt://127.0.0.1:9", password_env=PASSWORD_ENV, label="X", key_property="k", property="p")
    with pytest.raises(BridgeError, match=r"cannot reach the graph server at bolt://127.0.0.1:9 .* 4 attempts"):
        list(stream_embeddings(spec, 8))


def test_label_without_nodes_is_reported(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Nobody", key_property="key", property="emb")
    with pytest.raises(BridgeError, match="no nodes with label 'Nobody'"):
        list(stream_embeddings(spec, 64))


def test_missing_key_property_is_counted_with_an_example(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Paper", key_property="doi", property="emb")
    with pytest.raises(BridgeError, match=r"2708 of 2708 'Paper' nodes have no key property 'doi' \(e.g. node #"):
        list(stream_embeddings(spec, 64))


def test_missing_embedding_property_is_counted_with_an_example(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Member", key_property="key", property="emb")
    with pytest.raises(BridgeError, match=r"34 of 34 'Member' nodes have no embedding property 'emb' \(e.g. the node"):
        list(stream_embeddings(spec, 64))


def test_stored_vectors_of_another_dimension_name_both_dimensions(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Paper", key_property="key", property="emb")
    with pytest.raises(BridgeError, match="'emb' vectors have dimension 64 but the spec's dim is 128"):
        list(stream_embeddings(spec, 128))


def test_algorithm_config_dimension_must_match_the_spec(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(label="Member", key_property="key", algorithm="fastRP", config={"embeddingDimension": 64})
    with pytest.raises(BridgeError, match="embeddingDimension=64 but the embedding's dim is 32"):
        list(stream_embeddings(spec, 32))


def test_config_keys_arcadedb_would_silently_ignore_are_refused(loaded: Loaded) -> None:
    spec = loaded.bolt.spec(
        label="Member", key_property="key", algorithm="fastRP", config={"iterationWeights": [0.0, 1.0]}
    )
    with pytest.raises(BridgeError, match=r"algo\.fastrp does not support iterationWeights"):
        list(stream_embeddings(spec, 32))


@pytest.fixture(scope="module")
def neo4j_gds() -> Iterator[Bolt]:
    uri = os.environ.get("NEO4J_URI")
    if not uri:
        pytest.skip("set NEO4J_URI (and NEO4J_USER, NEO4J_PASSWORD) to test against Neo4j GDS")
    bolt = Bolt(uri, os.environ.get("NEO4J_USER", "neo4j"), os.environ.get("NEO4J_PASSWORD", ""), None)
    previous = os.environ.get(PASSWORD_ENV)
    os.environ[PASSWORD_ENV] = bolt.password
    yield bolt
    if previous is None:
        os.environ.pop(PASSWORD_ENV, None)
    else:
        os.environ[PASSWORD_ENV] = previous


def test_neo4j_gds_fastrp_streams_every_node_and_drops_its_projection(neo4j_gds: Bolt) -> None:
    label = f"VsKarate{uuid.uuid4().hex[:8]}"
    karate = nx.karate_club_graph()
    _load(neo4j_gds, label, [f"m{i}" for i in karate.nodes()], [(int(a), int(b)) for a, b in karate.edges()])
    try:
        with neo4j.GraphDatabase.driver(neo4j_gds.uri, auth=(neo4j_gds.user, neo4j_gds.password)) as driver:
            assert detect_dialect(driver) == "neo4j-gds"
        spec = neo4j_gds.spec(label=label, key_property="key", algorithm="fastRP", config={"randomSeed": 1})
        keys, vectors, _ = _collect(spec, 16)
        assert sorted(keys) == sorted(f"m{i}" for i in range(34)) and vectors.shape == (34, 16)
        left = neo4j_gds.run("CALL gds.graph.list() YIELD graphName WHERE graphName STARTS WITH 'vectorsync_' RETURN *")
        assert left == []
    finally:
        neo4j_gds.run(f"MATCH (n:{label}) DETACH DELETE n")


def test_neo4j_gds_stored_property_path(neo4j_gds: Bolt) -> None:
    label = f"VsStored{uuid.uuid4().hex[:8]}"
    _load(neo4j_gds, label, ["a", "b"], [(0, 1)], emb=[[1.0, 0.0], [0.0, 1.0]])
    try:
        keys, vectors, _ = _collect(neo4j_gds.spec(label=label, key_property="key", property="emb"), 2)
        assert dict(zip(keys, vectors.tolist(), strict=True)) == {"a": [1.0, 0.0], "b": [0.0, 1.0]}
    finally:
        neo4j_gds.run(f"MATCH (n:{label}) DETACH DELETE n")


def test_bolt_server_fixture_cleans_up(tmp_path: Path) -> None:
    """The context manager stops the server: its port refuses connections afterwards."""
    with start_arcadedb(tmp_path) as (uri, user, password, _database):
        with neo4j.GraphDatabase.driver(uri, auth=(user, password)) as driver:
            driver.verify_connectivity()
    with neo4j.GraphDatabase.driver(uri, auth=(user, password)) as driver, pytest.raises(neo4j.exceptions.DriverError):
        driver.verify_connectivity()
