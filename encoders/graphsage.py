"""GraphSAGE node embeddings (Hamilton, Ying & Leskovec 2017, "Inductive Representation Learning on
Large Graphs"), in plain torch.

A layer maps a node to ``normalise(W [h_self || AGG(h_neighbours)])`` (ReLU between layers), with
the mean aggregator or the pool aggregator (``max(ReLU(W_pool h + b))`` over the neighbours).
Training samples a fixed number of neighbours per hop (``fan_outs``, nearest hop first) and
minimises an unsupervised loss on the paper's positives and negatives: nodes that co-occur on short
random walks get similar vectors, nodes drawn from the degree^0.75 distribution dissimilar ones.
``loss = "contrastive"`` (the default) scores each node's walk partner against the other nodes'
partners in the batch and the sampled negatives with a softmax (InfoNCE at ``temperature``);
``"logistic"`` is the paper's own sigmoid loss. On Cora the softmax form makes vectors whose nearest
neighbours share a subject more often (benchmarks/RESULTS.md, issue 14). With labels it minimises
the cross-entropy of a linear classifier on the vectors instead. Inference aggregates
every neighbour, so a node's vector is a function of its neighbourhood alone: a new node, or one
whose edges or features changed, is embedded by the current model without retraining.

The graph travels in the batch: ``sync`` builds a ``LocalGraph`` (the features and neighbour lists
of the nodes involved) and every row of the frame names its node in it (columns ``GRAPH`` and
``NODE``). For a batch of target nodes the local graph must hold every node within ``layers`` hops
and the complete neighbour lists of those within ``layers - 1`` hops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from vectorsync.encoders.base import Batches, Encoder, EncodeResult, Progress, torch_threads
from vectorsync.encoders.params import GraphSAGEParams

#: Frame column holding the batch's ``LocalGraph`` (the same object in every row).
GRAPH = "__graph__"
#: Frame column holding each row's node position in that graph.
NODE = "__node__"
#: Dot products of unit vectors lie in [-1, 1]: scaled, the sigmoid of the paper's loss can saturate.
_LOGIT_SCALE = 10.0


@dataclass
class LocalGraph:
    """Node features (``(n, f)``) and neighbour lists (CSR ``indptr``/``indices``) of some nodes;
    ``labels`` (integer codes, -1 for none) when training is supervised."""

    features: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def from_edges(
        cls, features: np.ndarray, src: np.ndarray, dst: np.ndarray, orientation: str, labels: np.ndarray | None = None
    ) -> LocalGraph:
        """Neighbour lists from edges (node positions) followed as ``orientation`` says."""
        if orientation == "undirected":
            rows, cols = np.concatenate([src, dst]), np.concatenate([dst, src])
        elif orientation == "natural":
            rows, cols = src, dst
        else:
            rows, cols = dst, src
        order = np.lexsort((cols, rows))
        counts = np.bincount(rows, minlength=len(features))
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(np.asarray(features, dtype=np.float32), indptr, cols[order].astype(np.int64), labels)

    @property
    def size(self) -> int:
        return len(self.features)

    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)


def frame_of(graph: LocalGraph, keys: list[str], positions: np.ndarray, key_column: str) -> pd.DataFrame:
    """The batch frame for these nodes of ``graph``."""
    return pd.DataFrame({key_column: keys, GRAPH: [graph] * len(keys), NODE: np.asarray(positions, dtype=np.int64)})


def _graph_of(batch: pd.DataFrame) -> tuple[LocalGraph, np.ndarray]:
    if batch.empty:
        raise ValueError("the batch holds no nodes")
    return batch[GRAPH].iloc[0], batch[NODE].to_numpy(dtype=np.int64)


class GraphSAGEEncoder(Encoder):
    """GraphSAGE over a graph's node features and edges; see the module docstring."""

    type: ClassVar[str] = "graphsage"
    options: GraphSAGEParams

    def __init__(self, dim: int, columns: list[str], params: GraphSAGEParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        self._model: Any = None
        self._mean: np.ndarray | None = None
        self._scale: np.ndarray | None = None

    # --- the network --------------------------------------------------------------------------

    def _build(self, in_features: int, classes: int) -> None:
        import torch
        from torch import nn

        torch.manual_seed(self.options.seed)
        options = self.options
        widths = [in_features] + [options.hidden] * (options.layers - 1) + [self.dim]
        model = nn.Module()
        model.lins = nn.ModuleList(nn.Linear(2 * widths[i], widths[i + 1]) for i in range(options.layers))
        if options.aggregator == "pool":
            model.pools = nn.ModuleList(nn.Linear(widths[i], widths[i]) for i in range(options.layers))
        if classes:
            model.head = nn.Linear(self.dim, classes)
        self._model = model

    def _layer(self, i: int, h: Any, n_dst: int, dst: Any, src: Any) -> Any:
        """Layer ``i`` for the first ``n_dst`` rows of ``h``; messages flow ``src`` → ``dst`` (rows of h).

        ``W [h_self || mean(h_nbrs)]`` is computed as ``W_self h_self + mean(W_nbr h_nbrs)``, and the
        pool transform is applied per node: the per-edge messages then have the layer's output
        width, not the (possibly thousands of) input features.
        """
        import torch
        import torch.nn.functional as F

        lin = self._model.lins[i]
        width = h.shape[1]
        if self.options.aggregator == "pool":
            messages = F.relu(self._model.pools[i](h))[src]
            pooled = torch.zeros(n_dst, width, dtype=h.dtype).scatter_reduce(
                0, dst[:, None].expand_as(messages), messages, "amax", include_self=False
            )
            neighbours = pooled @ lin.weight[:, width:].T
        else:
            messages = (h @ lin.weight[:, width:].T)[src]
            neighbours = torch.zeros(n_dst, messages.shape[1], dtype=h.dtype).index_add_(0, dst, messages)
            neighbours = neighbours / torch.bincount(dst, minlength=n_dst).clamp(min=1)[:, None]
        out = h[:n_dst] @ lin.weight[:, :width].T + neighbours + lin.bias
        if i < self.options.layers - 1:
            out = F.relu(out)
        return F.normalize(out, dim=1)

    def _inputs(self, graph: LocalGraph) -> Any:
        import torch

        if graph.features.shape[1] != len(self._mean if self._mean is not None else []):
            raise ValueError(
                f"the nodes have {graph.features.shape[1]} feature values but the model was trained on "
                f"{0 if self._mean is None else len(self._mean)}; retrain it after changing the feature columns"
            )
        assert self._mean is not None and self._scale is not None
        return torch.from_numpy(((graph.features - self._mean) / self._scale).astype(np.float32))

    def _sampled(self, graph: LocalGraph, targets: np.ndarray, rng: np.random.Generator) -> Any:
        """Vectors of ``targets`` from sampled neighbourhoods (``fan_outs`` neighbours per hop)."""
        import torch

        inverse, unique = pd.factorize(targets)
        nodes = np.asarray(unique, dtype=np.int64)  # the first rows of every level are the level above
        blocks = []
        degree = graph.degree()
        for fan_out in self.options.hop_fan_outs:
            has = degree[nodes] > 0
            with_neighbours = np.flatnonzero(has)
            draws = (rng.random((len(with_neighbours), fan_out)) * degree[nodes[with_neighbours]][:, None]).astype(
                np.int64
            )
            picked = graph.indices[graph.indptr[nodes[with_neighbours]][:, None] + draws].ravel()
            codes, uniques = pd.factorize(np.concatenate([nodes, picked]))
            blocks.append((len(nodes), np.repeat(with_neighbours, fan_out), codes[len(nodes) :]))
            nodes = np.asarray(uniques, dtype=np.int64)
        inputs = self._inputs(graph)
        h = inputs[torch.from_numpy(nodes)]
        for i, (n_dst, dst, src) in enumerate(reversed(blocks)):
            h = self._layer(i, h, n_dst, torch.from_numpy(dst), torch.from_numpy(src))
        return h[torch.from_numpy(inverse)]

    def embed(self, graph: LocalGraph, targets: np.ndarray) -> np.ndarray:
        """The vectors of ``targets``, aggregating every neighbour (no sampling)."""
        import torch

        if self._model is None:
            raise ValueError("the GraphSAGE model is not trained yet; run `vectorsync train` first")
        dst = torch.from_numpy(np.repeat(np.arange(graph.size), graph.degree()))
        src = torch.from_numpy(graph.indices)
        with torch.no_grad(), torch_threads(self._threads()):
            h = self._inputs(graph)
            for i in range(self.options.layers):
                h = self._layer(i, h, graph.size, dst, src)
        return h.numpy()[np.asarray(targets, dtype=np.int64)]

    def _threads(self) -> int:
        return self.options.threads or 1

    # --- the Encoder protocol -----------------------------------------------------------------

    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        graph, targets = _graph_of(batch)
        return EncodeResult(self.embed(graph, targets).astype(np.float32))

    def fit(
        self,
        train: Batches,
        holdout: Batches | None = None,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        """Train on the nodes of the frame ``train`` yields (one frame: the whole training graph)."""
        import torch

        graph, nodes = _graph_of(pd.concat(list(train()), ignore_index=True))
        options = self.options
        rng = np.random.default_rng(seed)
        self._mean = graph.features[nodes].mean(axis=0)
        # one scale for all features: per-feature scaling would blow rare bag-of-words entries up
        self._scale = np.full_like(self._mean, max(float(graph.features[nodes].std()), 1e-12))
        labels = graph.labels
        classes = int(labels.max()) + 1 if labels is not None and (labels >= 0).any() else 0
        if classes and labels is not None:
            nodes = nodes[labels[nodes] >= 0]
        self._build(graph.features.shape[1], classes)
        optimiser = torch.optim.Adam(self._model.parameters(), lr=options.lr)
        negatives_from = _negative_distribution(graph, nodes)
        steps_per_epoch = max(1, math.ceil(len(nodes) / options.batch_size))
        total = options.epochs * steps_per_epoch
        step = 0
        loss_value = float("nan")
        with torch_threads(self._threads()):
            for epoch in range(options.epochs):
                losses = []
                for batch in _batches(rng.permutation(nodes), options.batch_size):
                    if classes:
                        assert labels is not None
                        logits = self._model.head(self._sampled(graph, batch, rng))
                        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[batch]))
                    else:
                        loss = self._unsupervised_loss(graph, batch, negatives_from, rng)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    if progress is not None:
                        progress(step, total, {"loss": losses[-1]})
                loss_value = float(np.mean(losses))
                self.history.append({"epoch": epoch + 1, "loss": loss_value})
        return {"loss": loss_value}

    def _unsupervised_loss(
        self, graph: LocalGraph, batch: np.ndarray, negatives_from: np.ndarray, rng: np.random.Generator
    ) -> Any:
        import torch
        import torch.nn.functional as F

        positives = _walk_partners(graph, batch, self.options.walk_length, rng)
        negatives = rng.choice(len(negatives_from), self.options.negatives, p=negatives_from)
        z = self._sampled(graph, np.concatenate([batch, positives, negatives]), rng)
        anchor, others = z[: len(batch)], z[len(batch) :]
        if self.options.loss == "contrastive":
            # row i's partner is column i; the other partners and the negatives are its rivals
            logits = anchor @ others.T / self.options.temperature
            return F.cross_entropy(logits, torch.arange(len(batch)))
        positive, negative = others[: len(batch)], others[len(batch) :]
        attract = F.logsigmoid(_LOGIT_SCALE * (anchor * positive).sum(dim=1)).mean()
        repel = F.logsigmoid(-_LOGIT_SCALE * anchor @ negative.T).mean()
        return -attract - self.options.negatives * repel

    def get_state(self) -> dict[str, Any]:
        if self._model is None or self._mean is None or self._scale is None:
            raise ValueError("the GraphSAGE model is not trained yet")
        return {
            "weights": {name: value.detach().clone() for name, value in self._model.state_dict().items()},
            "mean": self._mean.tolist(),
            "scale": self._scale.tolist(),
            "classes": int(self._model.head.out_features) if hasattr(self._model, "head") else 0,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._mean = np.asarray(state["mean"], dtype=np.float64)
        self._scale = np.asarray(state["scale"], dtype=np.float64)
        self._build(len(self._mean), int(state["classes"]))
        self._model.load_state_dict(state["weights"])
        self._model.eval()


def _batches(nodes: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(nodes), size):
        yield nodes[start : start + size]


def _negative_distribution(graph: LocalGraph, nodes: np.ndarray) -> np.ndarray:
    """The paper's negative-sampling distribution over all nodes: degree^0.75 (training nodes only)."""
    weights = np.zeros(graph.size)
    weights[nodes] = (graph.degree()[nodes] + 1.0) ** 0.75
    return weights / weights.sum()


def _walk_partners(graph: LocalGraph, starts: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """For each start node, a node at a random step of a random walk of ``length`` steps from it (the
    node itself where the walk cannot move)."""
    degree = graph.degree()
    current = starts.copy()
    stop_at = rng.integers(1, length + 1, len(starts))
    partner = starts.copy()
    for step in range(1, length + 1):
        movable = degree[current] > 0
        moves = graph.indptr[current[movable]] + (rng.random(movable.sum()) * degree[current[movable]]).astype(np.int64)
        current[movable] = graph.indices[moves]
        partner[stop_at == step] = current[stop_at == step]
    return partner
