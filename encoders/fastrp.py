"""Native FastRP node embeddings over an edge list (graphs whose edges live in Postgres).

Clean-room implementation of Chen et al. 2019, "Fast and Accurate Network Embeddings via Very
Sparse Random Projection", with the parameters Neo4j GDS documents for ``gds.fastRP``
(``iterationWeights``, ``nodeSelfInfluence``, ``normalizationStrength``, ``featureProperties``,
``propertyRatio``, ``randomSeed``, relationship weights and orientation).

How a vector is made:

1. Every node gets a very sparse random vector: each entry is ``+sqrt(s)`` or ``-sqrt(s)`` with
   probability ``1/(2s)`` each and 0 otherwise, ``s = sqrt(d)`` for the ``d`` random dimensions.
   The entries come from a counter-based hash of ``(random_seed, node key, slot)``, so a node's
   vector depends on its key only: reordering or adding nodes does not change anyone else's.
2. With ``property_ratio > 0`` the last ``round(property_ratio * dim)`` dimensions hold the node's
   features projected by a very sparse random matrix (one random vector per feature column, also
   hashed from the seed), concatenated to the structural part.
3. The initial vectors are scaled by ``degree ** normalization_strength``.
4. Each iteration averages the neighbours' vectors of the previous iteration (weighted by the
   relationship weights, following the orientation) and L2-normalises the result per node.
5. The embedding is ``node_self_influence * normalised initial vector + sum_i w_i * iteration_i``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import scipy.sparse as sp

Orientation = Literal["undirected", "natural", "reverse"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
#: Separates the hash streams of node vectors and feature vectors for the same seed.
_FEATURE_STREAM = np.uint64(0xD6E8FEB86659FD93)
_CHUNK_NODES = 1 << 15
_MAX_THREADS = 8


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place on a uint64 array (numpy wraps on overflow, as wanted)."""
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def _seed_word(seed: int) -> np.uint64:
    return _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)[0]


def node_keys(values: Sequence[object] | np.ndarray) -> np.ndarray:
    """Stable 64-bit keys for arbitrary node identifiers (Postgres keys of any type).

    Integer arrays are used as they are; anything else is hashed with BLAKE2b of its ``str()``,
    so the same key gives the same random vector on every machine and in every run.
    """
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    out = np.empty(len(array), dtype=np.uint64)
    for i, value in enumerate(array.tolist()):
        digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out.view(np.int64)


def _sign_table(density_s: float) -> np.ndarray:
    """Maps a uniform 16-bit draw to ``+sqrt(s)`` (probability ``1/(2s)``), ``-sqrt(s)`` (same) or 0."""
    cut = round(65536 / (2.0 * density_s))
    table = np.zeros(65536, dtype=np.float32)
    table[:cut] = np.sqrt(density_s)
    table[cut : 2 * cut] = -np.sqrt(density_s)
    return table


def _sparse_signs(row_words: np.ndarray, width: int, density_s: float) -> np.ndarray:
    """Very sparse random rows from per-row hashes: one 64-bit hash per 4 slots, 16 bits per slot."""
    words_per_row = -(-width // 4)
    counters = (np.arange(1, words_per_row + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    draws = _mix64(row_words[:, None] + counters).view("<u2")[:, :width]
    return _sign_table(density_s)[draws]


def random_vectors(node_ids: np.ndarray, width: int, random_seed: int) -> np.ndarray:
    """The sparse random projection rows of ``node_ids`` (float32, ``(n, width)``), hashed per key."""
    keys = np.ascontiguousarray(node_ids).astype(np.int64, copy=False).view(np.uint64)
    out = np.zeros((len(keys), width), dtype=np.float32)
    if width == 0 or len(keys) == 0:
        return out
    density_s = float(np.sqrt(width))
    seed = _seed_word(random_seed)

    def chunk(start: int) -> None:
        words = _mix64(keys[start : start + _CHUNK_NODES] ^ seed)
        out[start : start + _CHUNK_NODES] = _sparse_signs(words, width, density_s)

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(chunk, range(0, len(keys), _CHUNK_NODES)))
    return out


def _feature_projection(n_features: int, width: int, random_seed: int) -> np.ndarray:
    words = _mix64(np.arange(n_features, dtype=np.uint64) ^ (_seed_word(random_seed) ^ _FEATURE_STREAM))
    return _sparse_signs(words, width, float(np.sqrt(width)))


def _check_inputs(
    n_nodes: int,
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray | None,
    features: np.ndarray | None,
    node_ids: np.ndarray | None,
) -> None:
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"src and dst must be 1-D arrays of the same length, got {src.shape} and {dst.shape}")
    for name, ends in (("src", src), ("dst", dst)):
        if ends.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer node indexes, got dtype {ends.dtype}")
        bad = np.flatnonzero((ends < 0) | (ends >= n_nodes))
        if bad.size:
            raise ValueError(
                f"edge {bad[0]} has {name} node index {ends[bad[0]]}, outside 0..{n_nodes - 1} ({bad.size} such edges)"
            )
    if weights is not None:
        if weights.shape != src.shape:
            raise ValueError(f"weights must have one value per edge ({src.size}), got shape {weights.shape}")
        bad = np.flatnonzero(~np.isfinite(weights))
        if bad.size:
            raise ValueError(
                f"edge {bad[0]} ({src[bad[0]]} -> {dst[bad[0]]}) has weight {weights[bad[0]]}; "
                f"weights must be finite ({bad.size} such edges)"
            )
        if (weights < 0).any():
            first = int(np.flatnonzero(weights < 0)[0])
            raise ValueError(f"edge {first} has negative weight {weights[first]}; weights must be >= 0")
    if features is not None:
        if features.ndim != 2 or features.shape[0] != n_nodes:
            raise ValueError(f"features must have shape (n_nodes={n_nodes}, n_features), got {features.shape}")
        bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if bad_rows.size:
            raise ValueError(
                f"node {bad_rows[0]} has a NaN or infinite feature value ({bad_rows.size} such nodes); "
                "fill or drop missing features first"
            )
    if node_ids is not None:
        if node_ids.shape != (n_nodes,):
            raise ValueError(f"node_ids must have one key per node ({n_nodes}), got shape {node_ids.shape}")
        if node_ids.dtype.kind not in "iu":
            raise ValueError(f"node_ids must be integer keys (see node_keys()), got dtype {node_ids.dtype}")


def _propagation_matrix(
    n_nodes: int, src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None, orientation: Orientation
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-stochastic adjacency (row ``i`` averages the neighbours of ``i``) and node degrees."""
    if orientation == "natural":
        rows, cols = src, dst
    elif orientation == "reverse":
        rows, cols = dst, src
    elif orientation == "undirected":
        rows, cols = np.concatenate([src, dst]), np.concatenate([dst, src])
        if weights is not None:
            weights = np.concatenate([weights, weights])
    else:
        raise ValueError(f"orientation must be 'undirected', 'natural' or 'reverse', got {orientation!r}")
    data = np.ones(rows.size, dtype=np.float32) if weights is None else weights.astype(np.float32)
    index_dtype = np.int32 if n_nodes < 2**31 and rows.size < 2**31 else np.int64
    adjacency = sp.csr_matrix(
        (data, (rows.astype(index_dtype, copy=False), cols.astype(index_dtype, copy=False))),
        shape=(n_nodes, n_nodes),
        dtype=np.float32,
    )
    adjacency.sum_duplicates()
    degree = np.diff(adjacency.indptr).astype(np.float32)
    row_sum = np.asarray(adjacency.sum(axis=1), dtype=np.float32).ravel()
    inverse = np.divide(1.0, row_sum, out=np.zeros_like(row_sum), where=row_sum > 0)
    adjacency.data *= np.repeat(inverse, np.diff(adjacency.indptr))
    return adjacency, degree


def _row_blocks(matrix: sp.csr_matrix, parts: int) -> list[tuple[int, int]]:
    """Row ranges holding about the same number of stored entries each."""
    n = matrix.shape[0]
    if parts <= 1 or n < 50_000:
        return [(0, n)]
    targets = np.linspace(0, matrix.nnz, parts + 1)[1:-1]
    cuts = np.searchsorted(matrix.indptr, targets).tolist()
    bounds = [0, *cuts, n]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    np.divide(1.0, norms, out=norms, where=norms > 0)
    matrix *= norms[:, None]
    return matrix


def _threads() -> int:
    return max(1, min(_MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def fastrp(
    n_nodes: int,
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    dim: int,
    iteration_weights: Sequence[float] = (0.0, 1.0, 1.0),
    node_self_influence: float = 0.0,
    normalization_strength: float = 0.0,
    orientation: Orientation = "undirected",
    features: np.ndarray | None = None,
    property_ratio: float = 0.0,
    node_ids: np.ndarray | None = None,
    random_seed: int = 42,
) -> np.ndarray:
    """FastRP embeddings, float32 ``(n_nodes, dim)``; row ``i`` belongs to node index ``i``.

    ``src``/``dst`` are node indexes (0..n_nodes-1) of each edge, ``weights`` optional non-negative
    relationship weights. ``node_ids`` are stable per-node integer keys (``node_keys()`` turns any
    Postgres key into one); without them the index is the key, and vectors depend on row order.
    """
    src, dst = np.asarray(src), np.asarray(dst)
    weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    features = None if features is None else np.asarray(features, dtype=np.float64)
    node_ids = None if node_ids is None else np.asarray(node_ids)
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    if n_nodes < 0:
        raise ValueError(f"n_nodes must be >= 0, got {n_nodes}")
    iteration_weights = [float(w) for w in iteration_weights]
    if not iteration_weights:
        raise ValueError("iteration_weights must hold at least one weight (one per iteration)")
    if not 0.0 <= property_ratio <= 1.0:
        raise ValueError(f"property_ratio must be between 0 and 1, got {property_ratio}")
    property_dim = round(property_ratio * dim)
    if property_dim > 0 and (features is None or features.shape[-1] == 0):
        raise ValueError(f"property_ratio={property_ratio} needs node features, but none were given")
    if features is not None and property_dim == 0:
        raise ValueError(
            f"features were given but property_ratio={property_ratio} leaves them no dimension of {dim}; "
            "raise property_ratio or drop the features"
        )
    _check_inputs(n_nodes, src, dst, weights, features, node_ids)

    keys = np.arange(n_nodes, dtype=np.int64) if node_ids is None else node_ids
    initial = np.empty((n_nodes, dim), dtype=np.float32)
    initial[:, : dim - property_dim] = random_vectors(keys, dim - property_dim, random_seed)
    if property_dim:
        assert features is not None
        projection = _feature_projection(features.shape[1], property_dim, random_seed)
        initial[:, dim - property_dim :] = (features @ projection).astype(np.float32)

    adjacency, degree = _propagation_matrix(n_nodes, src, dst, weights, orientation)
    if normalization_strength != 0.0:
        scale = np.ones_like(degree)
        np.power(degree, np.float32(normalization_strength), out=scale, where=degree > 0)
        initial *= scale[:, None]

    # Row blocks run in threads: scipy's sparse product and numpy's ufuncs release the GIL.
    blocks = [(lo, hi, adjacency[lo:hi]) for lo, hi in _row_blocks(adjacency, _threads())]
    embedding = np.zeros((n_nodes, dim), dtype=np.float32)
    previous, current = initial, np.empty_like(initial)

    def iterate(block: tuple[int, int, sp.csr_matrix], weight: float) -> None:
        lo, hi, rows = block
        current[lo:hi] = _normalise_rows(np.asarray(rows @ previous, dtype=np.float32))
        if weight != 0.0:
            embedding[lo:hi] += np.float32(weight) * current[lo:hi]

    with ThreadPoolExecutor(len(blocks)) as pool:
        for iteration, weight in enumerate(iteration_weights):
            list(pool.map(lambda block, w=weight: iterate(block, w), blocks))
            if iteration == 0:
                # The initial vectors are needed once more, for self-influence; then recycled.
                if node_self_influence != 0.0:
                    embedding += np.float32(node_self_influence) * _normalise_rows(initial)
                previous, current = current, initial
            else:
                previous, current = current, previous
    return embedding
