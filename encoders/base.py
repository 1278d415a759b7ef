"""The encoder protocol every modality implements.

An encoder turns a batch of inputs (a pandas DataFrame holding the spec's input columns, already
resolved from references by ``sync.sources``) into a float32 matrix of shape ``(n, dim)``. It never
touches a database: training data arrives as a callable that yields DataFrame chunks, and the fitted
model is persisted as bytes that ``sync`` stores in the model registry.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

#: Yields the training data as DataFrame chunks; called once per epoch so data can be streamed.
Batches = Callable[[], Iterator[pd.DataFrame]]
#: Reports training progress: (step, total_steps, metrics such as {"loss": 0.12}).
Progress = Callable[[int, int, dict[str, float]], None]


class InputError(ValueError):
    """One input item cannot be encoded; names the column and says why."""

    def __init__(self, column: str | None, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


@dataclass
class EncodeResult:
    """Vectors for a batch; rows listed in ``failures`` (position → error) have no valid vector."""

    vectors: np.ndarray
    failures: dict[int, InputError] = field(default_factory=dict)


class Encoder(ABC):
    """A trainable (or pretrained) model mapping a batch of inputs to ``dim``-sized vectors."""

    #: Name used in specs (``encoder = { type = "..." }``) and in the model registry.
    type: ClassVar[str]
    #: Whether ``fit`` must run before ``encode`` (pretrained encoders set this to False).
    trainable: ClassVar[bool] = True

    def __init__(self, dim: int, columns: list[str], params: dict[str, Any] | None = None) -> None:
        self.dim = dim
        self.columns = list(columns)
        self.params = dict(params or {})

    @abstractmethod
    def fit(
        self,
        train: Batches,
        holdout: Batches | None = None,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        """Train on the chunks ``train`` yields; return metrics measured on ``holdout``."""

    @abstractmethod
    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        """Encode every row of ``batch``; bad rows go to ``failures``, never raise for one row."""

    @abstractmethod
    def get_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted encoder (tensors, preprocessing, vocabularies)."""

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_state`` returned."""

    def to_bytes(self) -> bytes:
        import torch

        buffer = io.BytesIO()
        payload = {
            "type": self.type,
            "dim": self.dim,
            "columns": self.columns,
            "params": self.params,
            "state": self.get_state(),
        }
        torch.save(payload, buffer)
        return buffer.getvalue()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run small models on ``count`` threads: for tiny layers, thread hand-offs cost more than
    they save (a tabular autoencoder trains ~10x faster on one thread than on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_encoder(blob: bytes) -> Encoder:
    """Rebuild an encoder from ``Encoder.to_bytes`` output, whatever its type."""
    import torch

    from vectorsync.encoders.registry import encoder_class

    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    encoder = encoder_class(payload["type"])(payload["dim"], payload["columns"], payload["params"])
    encoder.set_state(payload["state"])
    return encoder


def check_finite(vectors: np.ndarray, failures: dict[int, InputError], column: str | None) -> None:
    """Record rows whose output vector is not finite (NaN/inf inputs slipped through)."""
    bad = ~np.isfinite(vectors).all(axis=1)
    for position in np.flatnonzero(bad):
        failures.setdefault(int(position), InputError(column, "encoder produced a non-finite vector"))
