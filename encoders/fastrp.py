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
from dataclasses import dataclass, field
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


def _oriented(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None, orientation: Orientation
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Edges as (row, column, weight) of the propagation matrix: row ``i`` averages over its columns."""
    if orientation == "natural":
        return src, dst, weights
    if orientation == "reverse":
        return dst, src, weights
    if orientation == "undirected":
        both = None if weights is None else np.concatenate([weights, weights])
        return np.concatenate([src, dst]), np.concatenate([dst, src]), both
    raise ValueError(f"orientation must be 'undirected', 'natural' or 'reverse', got {orientation!r}")


def _propagation_matrix(
    n_nodes: int, src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None, orientation: Orientation
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-stochastic adjacency (row ``i`` averages the neighbours of ``i``) and node degrees."""
    rows, cols, weights = _oriented(src, dst, weights, orientation)
    data = np.ones(rows.size, dtype=np.float32) if weights is None else weights.astype(np.float32)
    index_dtype = np.int32 if n_nodes < 2**31 and rows.size < 2**31 else np.int64
    adjacency = sp.csr_matrix(
        (data, (rows.astype(index_dtype, copy=False), cols.astype(index_dtype, copy=False))),
        shape=(n_nodes, n_nodes),
        dtype=np.float32,
    )
    adjacency.sum_duplicates()
    degree = np.diff(adjacency.indptr).astype(np.float32)
    _row_normalise(adjacency)
    return adjacency, degree


def _row_normalise(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Scale each row to sum 1 in place (empty or zero-weight rows stay zero)."""
    row_sum = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    inverse = np.divide(1.0, row_sum, out=np.zeros_like(row_sum), where=row_sum > 0)
    matrix.data *= np.repeat(inverse, np.diff(matrix.indptr)).astype(matrix.dtype)
    return matrix


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


def _union(n: int, *positions: np.ndarray) -> np.ndarray:
    """The sorted distinct positions (all below ``n``) of these arrays: a mark per node is O(n) and
    several times faster than sorting or hashing the hundreds of thousands of entries a large
    update gathers."""
    mark = np.zeros(n, dtype=bool)
    for array in positions:
        mark[array] = True
    return np.flatnonzero(mark)


def _add_to_rows(matrix: sp.csr_matrix, delta: sp.csr_matrix, residue: float) -> sp.csr_matrix:
    """``matrix + delta`` with entries of magnitude below ``residue`` (and zeros) dropped from the rows
    ``delta`` touches (+w then -w may leave a rounding residue where an edge was: it must not count
    as an edge). Only those rows are merged; the others are copied as whole slices, which at a few
    thousand changed rows of a 10M-entry matrix costs a fraction of scipy's sum over every row."""
    touched = np.flatnonzero(np.diff(delta.indptr))
    if not len(touched):
        return matrix
    merged = (matrix[touched] + delta[touched]).tocsr()
    merged.data[np.abs(merged.data) < residue] = 0.0
    merged.eliminate_zeros()
    merged.sort_indices()
    lengths = np.diff(matrix.indptr)
    lengths[touched] = np.diff(merged.indptr)
    indptr = np.zeros(len(lengths) + 1, dtype=matrix.indptr.dtype)
    np.cumsum(lengths, out=indptr[1:])
    # the untouched stretches between touched rows, interleaved with the merged rows
    starts = np.concatenate([[0], touched + 1])
    stops = np.concatenate([touched, [matrix.shape[0]]])
    old = matrix.indptr
    pieces_data: list[np.ndarray] = []
    pieces_indices: list[np.ndarray] = []
    for i, (lo, hi) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
        pieces_data.append(matrix.data[old[lo] : old[hi]])
        pieces_indices.append(matrix.indices[old[lo] : old[hi]])
        if i < len(touched):
            pieces_data.append(merged.data[merged.indptr[i] : merged.indptr[i + 1]])
            pieces_indices.append(merged.indices[merged.indptr[i] : merged.indptr[i + 1]])
    data = np.concatenate(pieces_data).astype(matrix.dtype, copy=False)
    indices = np.concatenate(pieces_indices).astype(matrix.indices.dtype, copy=False)
    return sp.csr_matrix((data, indices, indptr), shape=matrix.shape)


def _accumulate(out: np.ndarray, weight: float, part: np.ndarray) -> None:
    """``out += weight * part`` without another temporary the size of ``part`` (``part`` is scratch):
    the vectors a large update writes make each one ~100 MB."""
    if weight != 1.0:
        part *= np.float32(weight)
    out += part


def _product(rows: sp.csr_matrix, dense: np.ndarray) -> np.ndarray:
    """``rows @ dense`` as float32, in row blocks on threads (scipy's product releases the GIL)."""
    blocks = _row_blocks(rows, _threads())
    if len(blocks) == 1:
        return np.asarray(rows @ dense, dtype=np.float32)
    out = np.empty((rows.shape[0], dense.shape[1]), dtype=np.float32)

    def block(bounds: tuple[int, int]) -> None:
        lo, hi = bounds
        out[lo:hi] = rows[lo:hi] @ dense

    with ThreadPoolExecutor(len(blocks)) as pool:
        list(pool.map(block, blocks))
    return out


def _threads() -> int:
    return max(1, min(_MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


@dataclass(frozen=True)
class FastRPParams:
    """FastRP's parameters (what, besides the graph, determines the vectors)."""

    dim: int
    iteration_weights: tuple[float, ...] = (0.0, 1.0, 1.0)
    node_self_influence: float = 0.0
    normalization_strength: float = 0.0
    orientation: Orientation = "undirected"
    property_ratio: float = 0.0
    random_seed: int = 42

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be at least 1, got {self.dim}")
        if not self.iteration_weights:
            raise ValueError("iteration_weights must hold at least one weight (one per iteration)")
        if not 0.0 <= self.property_ratio <= 1.0:
            raise ValueError(f"property_ratio must be between 0 and 1, got {self.property_ratio}")
        if self.orientation not in ("undirected", "natural", "reverse"):
            raise ValueError(f"orientation must be 'undirected', 'natural' or 'reverse', got {self.orientation!r}")

    @property
    def property_dim(self) -> int:
        return round(self.property_ratio * self.dim)

    def check_features(self, features: np.ndarray | None) -> None:
        if self.property_dim > 0 and (features is None or features.shape[-1] == 0):
            raise ValueError(f"property_ratio={self.property_ratio} needs node features, but none were given")
        if features is not None and self.property_dim == 0:
            raise ValueError(
                f"features were given but property_ratio={self.property_ratio} leaves them no dimension of "
                f"{self.dim}; raise property_ratio or drop the features"
            )

    def initial(self, keys: np.ndarray, features: np.ndarray | None, degree: np.ndarray) -> np.ndarray:
        """The initial vectors of nodes with these keys, features and degrees."""
        dim, property_dim = self.dim, self.property_dim
        initial = np.empty((len(keys), dim), dtype=np.float32)
        initial[:, : dim - property_dim] = random_vectors(keys, dim - property_dim, self.random_seed)
        if property_dim:
            assert features is not None
            projection = _feature_projection(features.shape[1], property_dim, self.random_seed)
            initial[:, dim - property_dim :] = (features @ projection).astype(np.float32)
        if self.normalization_strength != 0.0:
            scale = np.ones(len(keys), dtype=np.float32)
            np.power(degree.astype(np.float32), np.float32(self.normalization_strength), out=scale, where=degree > 0)
            initial *= scale[:, None]
        return initial


def _iterate(
    adjacency: sp.csr_matrix,
    initial: np.ndarray,
    params: FastRPParams,
    levels: list[np.ndarray] | None = None,
) -> np.ndarray:
    """The embedding from the row-stochastic adjacency and the initial vectors. With ``levels``
    (one ``(n, dim)`` array per iteration) every iteration's vectors are kept there."""
    n_nodes, dim = initial.shape
    # Row blocks run in threads: scipy's sparse product and numpy's ufuncs release the GIL.
    blocks = [(lo, hi, adjacency[lo:hi]) for lo, hi in _row_blocks(adjacency, _threads())]
    embedding = np.zeros((n_nodes, dim), dtype=np.float32)
    if params.node_self_influence != 0.0:
        embedding += np.float32(params.node_self_influence) * _normalise_rows(initial.copy())
    previous = initial
    spare = np.empty_like(initial) if levels is None else None

    def iterate(block: tuple[int, int, sp.csr_matrix], weight: float, current: np.ndarray) -> None:
        lo, hi, rows = block
        current[lo:hi] = _normalise_rows(np.asarray(rows @ previous, dtype=np.float32))
        if weight != 0.0:
            embedding[lo:hi] += np.float32(weight) * current[lo:hi]

    with ThreadPoolExecutor(len(blocks)) as pool:
        for iteration, weight in enumerate(params.iteration_weights):
            if levels is not None:
                current = levels[iteration]
            else:
                assert spare is not None
                current = spare
            list(pool.map(lambda block, w=weight, c=current: iterate(block, w, c), blocks))
            if levels is None:
                spare = previous  # the buffer read in this iteration is written in the next
            previous = current
    return embedding


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
    params = FastRPParams(
        dim=dim,
        iteration_weights=tuple(float(w) for w in iteration_weights),
        node_self_influence=node_self_influence,
        normalization_strength=normalization_strength,
        orientation=orientation,
        property_ratio=property_ratio,
        random_seed=random_seed,
    )
    src, dst = np.asarray(src), np.asarray(dst)
    weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    features = None if features is None else np.asarray(features, dtype=np.float64)
    node_ids = None if node_ids is None else np.asarray(node_ids)
    if n_nodes < 0:
        raise ValueError(f"n_nodes must be >= 0, got {n_nodes}")
    params.check_features(features)
    _check_inputs(n_nodes, src, dst, weights, features, node_ids)
    keys = np.arange(n_nodes, dtype=np.int64) if node_ids is None else node_ids
    adjacency, degree = _propagation_matrix(n_nodes, src, dst, weights, orientation)
    return _iterate(adjacency, params.initial(keys, features, degree), params)


# ---------------------------------------------------------------------------------------------
# Incremental FastRP
# ---------------------------------------------------------------------------------------------

#: A level's vector that moved by no more than this (max abs) is kept and not propagated further;
#: the stored vectors then stay within ~1e-6 of a full recompute, and errors never accumulate
#: because every recompute compares against the stored value.
PROPAGATION_TOLERANCE = 1e-7
#: Above this share of (live) nodes to recompute, one full recompute is cheaper.
FULL_RECOMPUTE_SHARE = 0.3


@dataclass
class Edges:
    """Edges as node positions (and weights, None when the graph is unweighted)."""

    src: np.ndarray
    dst: np.ndarray
    weights: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Edges:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class UpdateResult:
    """What an update did: ``written`` positions whose vector changed, ``mode`` ("incremental" or
    "full"), and the number of nodes recomputed at each iteration."""

    written: np.ndarray
    mode: str
    recomputed: list[int] = field(default_factory=list)


class IncrementalFastRP:
    """FastRP vectors of a changing graph, kept equal to a full recompute.

    FastRP's iteration ``k`` of a node averages iteration ``k - 1`` of its neighbours, so after a
    change only nodes within the iteration count of a changed row (or of a node whose initial
    vector changed: new nodes, features, degrees under ``normalization_strength``) can move. The
    state keeps every iteration's vectors and, per iteration, recomputes the nodes whose row
    changed or whose neighbours moved; a vector that moved by at most ``PROPAGATION_TOLERANCE`` is
    kept as it is and not propagated. When too many nodes are affected it recomputes everything.
    Positions are stable: removed nodes leave a hole (``alive`` is False).
    """

    def __init__(
        self,
        params: FastRPParams,
        node_ids: np.ndarray,
        edges: Edges,
        features: np.ndarray | None = None,
    ) -> None:
        node_ids = np.asarray(node_ids)
        n = len(node_ids)
        if features is not None:
            features = np.asarray(features, dtype=np.float64)
        params.check_features(features)
        weights = None if edges.weights is None else np.asarray(edges.weights, dtype=np.float64)
        _check_inputs(n, np.asarray(edges.src), np.asarray(edges.dst), weights, features, node_ids)
        self.params = params
        self.ids = node_ids.astype(np.int64)
        self.features = features
        self.alive = np.ones(n, dtype=bool)
        rows, cols, data = _oriented(np.asarray(edges.src), np.asarray(edges.dst), weights, params.orientation)
        self.weights = self._matrix(n, rows, cols, data if data is not None else np.ones(rows.size))
        self.counts = self._matrix(n, rows, cols, np.ones(rows.size))
        self.levels = [np.zeros((n, params.dim), dtype=np.float32) for _ in params.iteration_weights]
        self._full()

    @property
    def size(self) -> int:
        return len(self.ids)

    @staticmethod
    def _matrix(n: int, rows: np.ndarray, cols: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
        matrix = sp.csr_matrix((np.asarray(data, dtype=np.float64), (rows, cols)), shape=(n, n))
        matrix.sum_duplicates()
        return matrix

    def _degree(self, positions: np.ndarray | None = None) -> np.ndarray:
        nnz = np.diff(self.counts.indptr)
        return (nnz if positions is None else nnz[positions]).astype(np.float32)

    def _initial(self, positions: np.ndarray) -> np.ndarray:
        features = None if self.features is None else self.features[positions]
        return self.params.initial(self.ids[positions], features, self._degree(positions))

    def _full(self) -> None:
        adjacency = _row_normalise(self.weights.astype(np.float32))
        everyone = np.arange(self.size)
        _iterate(adjacency, self._initial(everyone), self.params, self.levels)

    def embedding(self, positions: np.ndarray) -> np.ndarray:
        """The current vectors of these positions."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.zeros((len(positions), self.params.dim), dtype=np.float32)
        if self.params.node_self_influence != 0.0:
            _accumulate(out, self.params.node_self_influence, _normalise_rows(self._initial(positions)))
        for weight, level in zip(self.params.iteration_weights, self.levels, strict=True):
            if weight != 0.0:
                _accumulate(out, weight, level[positions])
        return out

    def add_nodes(self, node_ids: np.ndarray) -> np.ndarray:
        """Room for new nodes (no edges yet, not alive until an update gives them features);
        returns their positions."""
        node_ids = np.asarray(node_ids, dtype=np.int64)
        start, count = self.size, len(node_ids)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        n = start + count
        self.ids = np.concatenate([self.ids, node_ids])
        self.alive = np.concatenate([self.alive, np.zeros(count, dtype=bool)])
        if self.features is not None:
            self.features = np.vstack([self.features, np.zeros((count, self.features.shape[1]))])
        self.weights.resize((n, n))
        self.counts.resize((n, n))
        self.levels = [np.vstack([level, np.zeros((count, level.shape[1]), dtype=np.float32)]) for level in self.levels]
        return np.arange(start, n)

    def update(
        self,
        *,
        added: Edges | None = None,
        removed: Edges | None = None,
        reset: np.ndarray | None = None,
        dead: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> UpdateResult:
        """Apply changes and bring the vectors up to date.

        ``reset`` nodes lose every edge first (their current edges come back through ``added``) and
        get ``features`` (one row per reset node); ``dead`` ones (a subset) are removed. ``added``
        and ``removed`` edges are node positions in the edge table's direction.
        """
        n = self.size
        reset = np.zeros(0, dtype=np.int64) if reset is None else np.asarray(reset, dtype=np.int64)
        dead = np.zeros(0, dtype=np.int64) if dead is None else np.asarray(dead, dtype=np.int64)
        changed_rows = [reset]
        degree_before = self._degree()
        if len(reset):
            changed_rows.append(self._neighbours(reset))
            keep = np.ones(n)
            keep[reset] = 0.0
            mask = sp.diags(keep, format="csr")
            self.weights = (mask @ self.weights @ mask).tocsr()
            self.counts = (mask @ self.counts @ mask).tocsr()
            for matrix in (self.weights, self.counts):
                matrix.eliminate_zeros()
        # removals and additions go in as one signed delta: each sum with the big matrix is O(edges)
        delta_rows, delta_cols, delta_weights, delta_counts = [], [], [], []
        for edges, sign in ((removed, -1.0), (added, 1.0)):
            if edges is None or not len(edges):
                continue
            rows, cols, data = _oriented(np.asarray(edges.src), np.asarray(edges.dst), edges.weights,
                                         self.params.orientation)
            ones = np.full(rows.size, sign)
            delta_rows.append(rows)
            delta_cols.append(cols)
            delta_weights.append(ones if data is None else sign * np.asarray(data, dtype=np.float64))
            delta_counts.append(ones)
            changed_rows.append(rows)
        if delta_rows:
            rows, cols = np.concatenate(delta_rows), np.concatenate(delta_cols)
            self.weights = _add_to_rows(self.weights, self._matrix(n, rows, cols, np.concatenate(delta_weights)), 1e-12)
            self.counts = _add_to_rows(self.counts, self._matrix(n, rows, cols, np.concatenate(delta_counts)), 0.0)
            if (self.counts.data < 0).any():
                raise ValueError("an edge was removed that the graph does not hold; recompute the graph in full")
        if len(reset):
            if features is not None and self.features is not None:
                self.features[reset] = features
            self.alive[reset] = True
            self.alive[dead] = False
            for level in self.levels:
                level[dead] = 0.0
        rows_changed = _union(n, *changed_rows)
        moved_initial = reset[self.alive[reset]]
        if self.params.normalization_strength != 0.0:
            degree_moved = rows_changed[self._degree(rows_changed) != degree_before[rows_changed]]
            moved_initial = _union(n, moved_initial, degree_moved)
        return self._propagate(rows_changed, moved_initial, reset[self.alive[reset]])

    def _neighbours(self, positions: np.ndarray) -> np.ndarray:
        """Nodes whose row holds one of ``positions`` (they average over it)."""
        columns = self.counts if self.params.orientation == "undirected" else self.counts.T.tocsr()
        return _union(self.size, columns[positions].indices)

    def _propagate(self, rows_changed: np.ndarray, moved_initial: np.ndarray, fresh: np.ndarray) -> UpdateResult:
        live = int(self.alive.sum())
        limit = FULL_RECOMPUTE_SHARE * max(live, 1)
        written = [fresh]
        if self.params.node_self_influence != 0.0:
            written.append(moved_initial)
        moved = moved_initial
        recomputed: list[int] = []
        transposed = self.counts if self.params.orientation == "undirected" else self.counts.T.tocsr()
        for iteration, weight in enumerate(self.params.iteration_weights):
            followers = transposed[moved].indices if len(moved) else np.zeros(0, dtype=np.int64)
            candidates = _union(self.size, rows_changed, followers)
            candidates = candidates[self.alive[candidates]]
            recomputed.append(len(candidates))
            if len(candidates) > limit:
                self._full()
                return UpdateResult(np.flatnonzero(self.alive), "full", recomputed)
            if not len(candidates):
                moved = candidates
                continue
            rows = _row_normalise(self.weights[candidates].astype(np.float32))
            if iteration == 0:
                columns = _union(self.size, rows.indices)
                local = sp.csr_matrix(
                    (rows.data, np.searchsorted(columns, rows.indices), rows.indptr),
                    shape=(len(candidates), len(columns)),
                )
                fresh_vectors = _normalise_rows(_product(local, self._initial(columns)))
            else:
                fresh_vectors = _normalise_rows(_product(rows, self.levels[iteration - 1]))
            level = self.levels[iteration]
            shift = np.abs(fresh_vectors - level[candidates]).max(axis=1)
            keep = shift > PROPAGATION_TOLERANCE
            moved = candidates[keep]
            level[moved] = fresh_vectors[keep]
            if weight != 0.0:
                written.append(moved)
        return UpdateResult(_union(self.size, *written), "incremental", recomputed)
