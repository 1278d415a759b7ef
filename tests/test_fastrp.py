"""Native FastRP: quality on Cora, determinism per node key, parameter effects, input errors."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from vectorsync.encoders.fastrp import fastrp, node_keys, random_vectors


@dataclass(frozen=True)
class Cora:
    ids: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    labels: np.ndarray
    features: np.ndarray


@pytest.fixture(scope="module")
def cora() -> Cora:
    graphdatascience = pytest.importorskip("graphdatascience")
    folder = os.path.join(os.path.dirname(graphdatascience.__file__), "resources", "cora")
    nodes = pd.read_parquet(os.path.join(folder, "cora_nodes.parquet.gzip"))
    rels = pd.read_parquet(os.path.join(folder, "cora_rels.parquet.gzip"))
    ids = nodes["nodeId"].to_numpy(np.int64)
    position = pd.Series(np.arange(len(ids)), index=ids)
    return Cora(
        ids=ids,
        src=position[rels["sourceNodeId"]].to_numpy(),
        dst=position[rels["targetNodeId"]].to_numpy(),
        labels=nodes["subject"].to_numpy(),
        features=np.stack(nodes["features"].to_numpy()).astype(np.float32),
    )


def _accuracy(vectors: np.ndarray, labels: np.ndarray) -> float:
    return float(cross_val_score(LogisticRegression(max_iter=2000), vectors, labels, cv=3).mean())


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def test_cora_structure_only_classifies_subjects_far_above_chance(cora: Cora) -> None:
    vectors = fastrp(len(cora.ids), cora.src, cora.dst, dim=256, iteration_weights=[0, 1, 1, 1], node_ids=cora.ids)
    accuracy = _accuracy(vectors, cora.labels)
    majority = np.bincount(cora.labels).max() / len(cora.labels)
    print(f"Cora structure-only FastRP accuracy {accuracy:.3f} (majority class {majority:.3f}, 7 classes)")
    assert vectors.dtype == np.float32 and vectors.shape == (len(cora.ids), 256)
    assert accuracy > 0.65


def test_cora_node_features_improve_accuracy(cora: Cora) -> None:
    common = dict(dim=256, iteration_weights=[0, 1, 1, 1], node_ids=cora.ids)
    structure = fastrp(len(cora.ids), cora.src, cora.dst, **common)
    with_features = fastrp(len(cora.ids), cora.src, cora.dst, features=cora.features, property_ratio=0.5, **common)
    accuracy = _accuracy(with_features, cora.labels)
    print(f"Cora FastRP with features (propertyRatio 0.5) accuracy {accuracy:.3f}")
    assert accuracy > 0.80
    assert accuracy > _accuracy(structure, cora.labels)


def test_connected_nodes_are_more_similar_than_random_pairs(cora: Cora) -> None:
    vectors = fastrp(len(cora.ids), cora.src, cora.dst, dim=128, node_ids=cora.ids)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(cora.ids), (2, 5000))
    edges = _cosine_rows(vectors[cora.src], vectors[cora.dst]).mean()
    random_pairs = _cosine_rows(vectors[a], vectors[b]).mean()
    assert edges > random_pairs + 0.3


def test_same_seed_gives_identical_vectors(cora: Cora) -> None:
    first = fastrp(len(cora.ids), cora.src, cora.dst, dim=64, node_ids=cora.ids, random_seed=7)
    second = fastrp(len(cora.ids), cora.src, cora.dst, dim=64, node_ids=cora.ids, random_seed=7)
    other = fastrp(len(cora.ids), cora.src, cora.dst, dim=64, node_ids=cora.ids, random_seed=8)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_shuffled_node_order_gives_the_same_vector_per_node(cora: Cora) -> None:
    n = len(cora.ids)
    original = fastrp(n, cora.src, cora.dst, dim=64, node_ids=cora.ids, features=cora.features, property_ratio=0.25)
    order = np.random.default_rng(3).permutation(n)  # new position -> old position
    new_position = np.empty(n, dtype=np.int64)
    new_position[order] = np.arange(n)
    edge_order = np.random.default_rng(4).permutation(len(cora.src))
    shuffled = fastrp(
        n,
        new_position[cora.src][edge_order],
        new_position[cora.dst][edge_order],
        dim=64,
        node_ids=cora.ids[order],
        features=cora.features[order],
        property_ratio=0.25,
    )
    np.testing.assert_allclose(shuffled, original[order], rtol=1e-5, atol=1e-6)


def test_random_projection_is_very_sparse_with_the_documented_values() -> None:
    dim = 256
    rows = random_vectors(np.arange(20_000, dtype=np.int64), dim, random_seed=1)
    s = np.sqrt(dim)
    nonzero = rows[rows != 0]
    assert set(np.unique(np.abs(nonzero)).round(4)) == {round(float(np.sqrt(s)), 4)}
    assert abs((rows != 0).mean() - 1 / s) < 0.005
    assert abs((nonzero > 0).mean() - 0.5) < 0.01


def test_string_keys_hash_to_stable_integers() -> None:
    keys = node_keys(["a", "b", "a"])
    assert keys.dtype == np.int64 and keys[0] == keys[2] != keys[1]
    np.testing.assert_array_equal(node_keys(["a", "b"]), node_keys(["a", "b"]))


def test_iteration_weights_choose_the_hops_that_count() -> None:
    # A path 0-1-2-3-4: with only the first iteration, 0 sees just its neighbour 1.
    src, dst = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    one_hop = fastrp(5, src, dst, dim=64, iteration_weights=[1.0])
    two_hops = fastrp(5, src, dst, dim=64, iteration_weights=[0.0, 1.0])
    initial = random_vectors(np.arange(5, dtype=np.int64), 64, 42)
    assert _cosine_rows(one_hop[[0]], initial[[1]])[0] == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(one_hop, two_hops)
    # Two hops from 0 reach 0 itself (via 1) and 2.
    expected = initial[0] + initial[2]
    assert _cosine_rows(two_hops[[0]], expected[None, :])[0] == pytest.approx(1.0, abs=1e-5)


def test_node_self_influence_pulls_each_vector_towards_its_own_random_vector() -> None:
    src, dst = np.array([0, 1, 2]), np.array([1, 2, 3])
    initial = random_vectors(np.arange(4, dtype=np.int64), 64, 42)
    without = fastrp(4, src, dst, dim=64, iteration_weights=[1.0], node_self_influence=0.0)
    strong = fastrp(4, src, dst, dim=64, iteration_weights=[1.0], node_self_influence=5.0)
    assert (_cosine_rows(strong, initial) > 0.9).all()
    assert (_cosine_rows(without, initial) < 0.5).all()


def test_isolated_node_gets_zero_vector_without_self_influence_and_its_own_with_it() -> None:
    src, dst = np.array([0]), np.array([1])
    plain = fastrp(3, src, dst, dim=32)
    with_self = fastrp(3, src, dst, dim=32, node_self_influence=1.0)
    assert not plain[2].any()
    assert np.linalg.norm(with_self[2]) == pytest.approx(1.0, abs=1e-5)


def test_orientation_natural_follows_edge_direction() -> None:
    src, dst = np.array([0]), np.array([1])
    natural = fastrp(2, src, dst, dim=32, iteration_weights=[1.0], orientation="natural")
    reverse = fastrp(2, src, dst, dim=32, iteration_weights=[1.0], orientation="reverse")
    assert natural[0].any() and not natural[1].any()
    assert reverse[1].any() and not reverse[0].any()


def test_normalization_strength_changes_the_embedding(cora: Cora) -> None:
    base = fastrp(len(cora.ids), cora.src, cora.dst, dim=64, node_ids=cora.ids)
    scaled = fastrp(len(cora.ids), cora.src, cora.dst, dim=64, node_ids=cora.ids, normalization_strength=-0.5)
    assert not np.allclose(base, scaled)


def test_relationship_weights_are_followed() -> None:
    src, dst = np.array([0, 0]), np.array([1, 2])
    initial = random_vectors(np.arange(3, dtype=np.int64), 64, 42)
    vectors = fastrp(3, src, dst, np.array([1.0, 0.0]), dim=64, iteration_weights=[1.0])
    assert _cosine_rows(vectors[[0]], initial[[1]])[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"src": np.array([0, 5]), "dst": np.array([1, 1])}, "edge 1 has src node index 5"),
        ({"src": np.array([0, 1]), "dst": np.array([1, -1])}, "edge 1 has dst node index -1"),
        ({"weights": np.array([1.0, np.nan])}, "edge 1 .* has weight nan"),
        ({"features": np.array([[1.0], [np.nan], [0.0]]), "property_ratio": 0.5}, "node 1 has a NaN"),
        ({"property_ratio": 0.5}, "needs node features"),
        ({"features": np.ones((3, 2))}, "features were given but property_ratio=0.0"),
        ({"orientation": "sideways"}, "orientation must be"),
        ({"node_ids": np.array([1, 2])}, "one key per node"),
        ({"iteration_weights": []}, "at least one weight"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(kwargs: dict, message: str) -> None:
    args = {"src": np.array([0, 1]), "dst": np.array([1, 2]), "weights": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        fastrp(3, args.pop("src"), args.pop("dst"), args.pop("weights"), dim=8, **args)


def test_large_random_graph_runs_in_seconds() -> None:
    n, m = 200_000, 1_000_000
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    start = time.perf_counter()
    vectors = fastrp(n, src, dst, dim=128, node_ids=np.arange(n, dtype=np.int64) * 31)
    elapsed = time.perf_counter() - start
    print(f"FastRP {n} nodes, {m} edges, dim 128, 3 iterations: {elapsed:.2f}s")
    assert np.isfinite(vectors).all()
    assert elapsed < 20
