"""Native GraphSAGE: trained with ``vectorsync train`` on Postgres edges and node features, stored as
a model version, and inductive: new nodes get vectors through the queue without retraining."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.test_graph_sync import FEATURES, cora_copy_data, load_cora
from vectorsync.encoders.graphsage import GraphSAGEEncoder, LocalGraph, frame_of

SAGE = """
[[embeddings]]
name = "{name}"
table = "{table}"
key = "id"
modality = "graph"
dim = 64
index = "none"
encoder = {{ type = "graphsage", aggregator = "{aggregator}"{options} }}

[embeddings.graph]
edges = "{edges}"
feature_columns = ["features"]
"""


def sage_spec(
    name: str, table: str = "papers", edges: str = "cites", aggregator: str = "mean", options: str = ""
) -> str:
    """A GraphSAGE embedding of Cora; ``options`` are more encoder keys (``, key = value``)."""
    return SAGE.format(name=name, table=table, edges=edges, aggregator=aggregator, options=options)


def subjects(conn: psycopg.Connection, table: str = "papers") -> dict[str, int]:
    return dict(conn.execute(f"SELECT id::text, subject FROM {table}").fetchall())


def test_graphsage_on_cora_agrees_with_subjects_at_least_as_well_as_fastrp_with_features(
    conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    """Unsupervised, and supervised by the subjects of half the papers; agreement is measured on the
    other half (whose subjects training never saw), against FastRP with features on the same papers."""
    load_cora(conn)
    conn.execute("ALTER TABLE papers ADD COLUMN known_subject integer")
    conn.execute("UPDATE papers SET known_subject = subject WHERE id % 2 = 0")
    supervised = sage_spec("sage_supervised", options=', epochs = 10, label_column = "known_subject"')
    config = write_config(sage_spec("sage") + supervised + FEATURES)
    assert cli("migrate", config=config).code == 0
    for name in ("sage", "sage_supervised"):
        result = cli("train", name, config=config)
        assert result.code == 0, result.err + result.out
    encoder, weights = conn.execute(
        "SELECT encoder_type, length(weights) FROM vectorsync.models WHERE embedding = 'sage'"
    ).fetchone()
    assert encoder == "graphsage" and weights > 0
    assert cli("sync", config=config).code == 0
    assert conn.execute("SELECT count(*) FROM sage_embeddings").fetchone()[0] == 2708
    labels = subjects(conn)
    unseen = {k: v for k, v in labels.items() if int(k) % 2 == 1}
    names = ("sage", "sage_supervised", "cora_features")
    agreement = {name: _agreement_of(conn, name, unseen, labels) for name in names}
    print(f"\nCora 5-NN subject agreement on the papers whose subject training did not see: {agreement}")
    majority = max(np.bincount(list(labels.values()))) / len(labels)
    assert agreement["sage"] > majority + 0.4
    # the defaults' unsupervised model against FastRP with features; seeds 0-2 measured 0.821-0.827
    # against 0.821 (benchmarks/RESULTS.md, issue 14), so a hair of slack for another machine's float sums
    assert agreement["sage"] >= agreement["cora_features"] - 0.005
    assert agreement["sage_supervised"] >= agreement["cora_features"]


def test_new_nodes_get_vectors_from_the_queue_as_good_as_transductive_ones(
    conn: psycopg.Connection, write_config: Callable[[str], Path], cli: Callable[..., Any]
) -> None:
    from vectorsync.sync import catalog, worker
    from vectorsync.sync.spec import load_config

    nodes = load_cora(conn)  # papers + cites: the transductive graph
    rng = np.random.default_rng(0)
    held_out = sorted(rng.choice(nodes["nodeId"].to_numpy(), size=len(nodes) // 5, replace=False).tolist())
    conn.execute("CREATE TABLE growing (LIKE papers INCLUDING ALL)")
    conn.execute("INSERT INTO growing SELECT * FROM papers WHERE id <> ALL(%s)", (held_out,))
    conn.execute("CREATE TABLE growing_cites (LIKE cites)")
    conn.execute(
        "INSERT INTO growing_cites SELECT * FROM cites WHERE source <> ALL(%(h)s) AND target <> ALL(%(h)s)",
        {"h": held_out},
    )
    config = write_config(sage_spec("whole") + sage_spec("inductive", table="growing", edges="growing_cites"))
    assert cli("migrate", config=config).code == 0
    for name in ("whole", "inductive"):
        result = cli("train", name, config=config)
        assert result.code == 0, result.err + result.out
        assert cli("sync", name, config=config).code == 0
    version = conn.execute("SELECT current_version FROM vectorsync.embeddings WHERE name = 'inductive'").fetchone()
    conn.execute("TRUNCATE vectorsync.queue")

    # the other 20 %: their rows, then their edges (each statement queues what it touches)
    conn.execute("INSERT INTO growing SELECT * FROM papers WHERE id = ANY(%s)", (held_out,))
    conn.execute(
        "INSERT INTO growing_cites SELECT * FROM cites WHERE source = ANY(%(h)s) OR target = ANY(%(h)s)",
        {"h": held_out},
    )
    spec = load_config(config).embedding("inductive")
    emb = catalog.load(conn, spec)
    done = worker.drain(conn, emb, load_config(config).worker, batch_size=64)
    assert done.failed == 0 and done.embedded >= len(held_out)
    stamped = conn.execute(
        "SELECT count(*) FROM inductive_embeddings WHERE id = ANY(%s) AND model_version = %s", (held_out, version[0])
    ).fetchone()[0]
    assert stamped == len(held_out)  # the same model: nothing was retrained

    labels = subjects(conn)
    new = {str(k): labels[str(k)] for k in held_out}
    inductive = _agreement_of(conn, "inductive", new, labels)
    transductive = _agreement_of(conn, "whole", new, labels)
    print(f"\nCora 5-NN agreement of the 20 % inserted later: inductive {inductive:.3f}, "
          f"transductive {transductive:.3f}")
    assert inductive >= transductive - 0.05


def _agreement_of(conn: psycopg.Connection, name: str, nodes: dict[str, int], labels: dict[str, int]) -> float:
    agree = total = 0
    for key in nodes:
        for neighbour, _ in conn.execute("SELECT * FROM vectorsync.nearest(%s, %s, 5)", (name, key)):
            agree += labels[neighbour] == labels[key]
            total += 1
    return agree / total


def test_a_stored_model_embeds_the_same_as_the_trained_one() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 8))
    src, dst = rng.integers(0, 300, 900), rng.integers(0, 300, 900)
    graph = LocalGraph.from_edges(features, src, dst, "undirected")
    for aggregator in ("mean", "pool"):
        encoder = GraphSAGEEncoder(16, ["f"], {"type": "graphsage", "epochs": 2, "aggregator": aggregator})
        encoder.fit(lambda g=graph: iter([frame_of(g, [str(i) for i in range(300)], np.arange(300), "k")]))
        from vectorsync.encoders.base import load_encoder

        again = load_encoder(encoder.to_bytes())
        np.testing.assert_allclose(again.embed(graph, np.arange(300)), encoder.embed(graph, np.arange(300)), atol=1e-6)


@pytest.mark.parametrize("loss", ["contrastive", "logistic"])
def test_either_unsupervised_loss_finds_communities_the_features_barely_show(loss: str) -> None:
    """Two communities joined by a few edges; each node's features are its community's direction
    under heavy noise. The vectors' nearest neighbours come from the node's own community far more
    often than the raw features' do."""
    rng = np.random.default_rng(3)
    community = np.repeat([0, 1], 150)
    src, dst = rng.integers(0, 300, 3000), rng.integers(0, 300, 3000)
    kept = (community[src] == community[dst]) | (rng.random(3000) < 0.03)
    features = np.where(community[:, None] == 0, 0.3, -0.3) + rng.normal(size=(300, 8))
    graph = LocalGraph.from_edges(features, src[kept], dst[kept], "undirected")
    encoder = GraphSAGEEncoder(16, ["f"], {"type": "graphsage", "loss": loss, "epochs": 3})
    encoder.fit(lambda: iter([frame_of(graph, [str(i) for i in range(300)], np.arange(300), "k")]))
    vectors = encoder.embed(graph, np.arange(300))
    assert np.isfinite(vectors).all()
    assert _same_community_share(features, community) < 0.8
    assert _same_community_share(vectors, community) > 0.9


def _same_community_share(vectors: np.ndarray, community: np.ndarray) -> float:
    """Share of each node's 5 nearest (cosine) that belong to its community."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :5]
    return float((community[nearest] == community[:, None]).mean())


def test_inference_over_a_neighbourhood_equals_the_whole_graph() -> None:
    """A node's vector from its local L-hop graph (what the worker reads) is its whole-graph vector."""
    rng = np.random.default_rng(4)
    n = 500
    features = rng.normal(size=(n, 6))
    src, dst = rng.integers(0, n, 1200), rng.integers(0, n, 1200)
    whole = LocalGraph.from_edges(features, src, dst, "undirected")
    encoder = GraphSAGEEncoder(8, ["f"], {"type": "graphsage", "epochs": 1, "layers": 2})
    encoder.fit(lambda: iter([frame_of(whole, [str(i) for i in range(n)], np.arange(n), "k")]))
    target = 7
    nodes, frontier, kept = [target], [target], set()
    for _ in range(2):  # edges touching the frontier, two hops out
        touching = [e for e in range(len(src)) if (src[e] in frontier or dst[e] in frontier) and e not in kept]
        kept.update(touching)
        frontier = [v for e in touching for v in (src[e], dst[e]) if v not in nodes]
        nodes += list(dict.fromkeys(frontier))
    position = {v: i for i, v in enumerate(nodes)}
    edges = np.array([(position[src[e]], position[dst[e]]) for e in sorted(kept)])
    local = LocalGraph.from_edges(features[nodes], edges[:, 0], edges[:, 1], "undirected")
    np.testing.assert_allclose(encoder.embed(local, [0])[0], encoder.embed(whole, [target])[0], atol=1e-5)


@pytest.fixture(autouse=True)
def _cora_available() -> None:
    cora_copy_data()
