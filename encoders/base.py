"""The encoder protocol every modality implements.

An encoder turns a batch of inputs (a pandas DataFrame holding the spec's input columns, already
resolved from references by ``sync.sources``) into a float32 matrix of shape ``(n, dim)``. It never
touches a database: training data arrives as a callable that yields DataFrame chunks, and the fitted
model is persisted as bytes that ``sync`` stores in the model registry.

Those bytes are data, never code: a safetensors file whose tensors are the weights and whose header
metadata holds everything else (type, parameters, preprocessing, vocabularies) as JSON. Loading
them runs no unpickler, so a crafted registry row can at worst fail to load.
"""

from __future__ import annotations

import json
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from vectorsync.encoders.params import EncoderParams, validate_params
from vectorsync.errors import InputError, ModelError

#: Yields the training data as DataFrame chunks; called once per epoch so data can be streamed.
Batches = Callable[[], Iterator[pd.DataFrame]]
#: Reports training progress: (step, total_steps, metrics such as {"loss": 0.12}).
Progress = Callable[[int, int, dict[str, float]], None]


#: Written into every stored model's safetensors metadata; anything else is refused on load.
MODEL_FORMAT = "vectorsync.model/1"
_META_KEY = "vectorsync"
_TENSOR = "__tensor__"


class DeviceError(ModelError):
    """The torch device a spec asks for is not on this machine."""


def resolve_device(requested: str | None) -> str:
    """The torch device to use: ``auto`` (or None) is CUDA when torch sees a GPU, else the CPU; an
    explicit CUDA device without one is a ``DeviceError`` rather than a torch error mid-batch."""
    import torch

    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device = {requested!r} but torch sees no CUDA GPU on this machine; set device = \"auto\" or \"cpu\""
        )
    return requested


class ModelFormatError(ModelError, ValueError):
    """Stored model bytes are not a model in vectorsync's safe format (old pickle, damaged, crafted)."""


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

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        self.dim = dim
        self.columns = list(columns)
        #: The validated parameters (``encoders.params``); a plain dict is validated here.
        self.options = validate_params(self.type, params)
        #: The parameters that were set (what the registry records), without defaults.
        self.params: dict[str, Any] = self.options.model_dump(exclude={"type"}, exclude_unset=True)
        #: One entry per training epoch, e.g. ``{"epoch": 1, "loss": 0.12}``; ``fit`` fills it so the
        #: registry can keep each version's training curve.
        self.history: list[dict[str, float]] = []

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

    def start_loading(self, threads: int, setup_torch: Callable[[], object]) -> None:
        """Get ready to encode on ``threads`` threads. ``setup_torch`` imports torch and sets its
        threads; it runs first when this encoder runs on torch.

        A pretrained model does this in a background thread (imports and weights take seconds), so
        its caller can claim and read its first batch meanwhile; ``encode`` waits for it. Encoders
        whose module already imported torch do it here and now.
        """
        setup_torch()

    def wait_loaded(self) -> None:
        """Block until what ``start_loading`` began is done (at once for most encoders); its errors
        are not raised here but by the ``encode`` that needs what failed to load."""
        return

    @property
    def device(self) -> str:
        """Where to train and encode: the ``device`` parameter resolved (``resolve_device``)."""
        return resolve_device(getattr(self.options, "device", "cpu"))

    #: Parameters that only govern input handling: the spec's current value overrides the stored one
    #: when a model is loaded (e.g. the pixel budget), so changing them needs no retraining.
    runtime_params: ClassVar[tuple[str, ...]] = ()

    def to_bytes(self) -> bytes:
        """The fitted encoder as a safetensors file: tensors as tensors, everything else as JSON."""
        from safetensors.torch import save

        tensors: dict[str, Any] = {}
        header = {
            "format": MODEL_FORMAT,
            "type": self.type,
            "dim": self.dim,
            "columns": self.columns,
            "params": _pack(self.params, "params", tensors),
            "state": _pack(self.get_state(), "state", tensors),
        }
        return save(tensors, metadata={_META_KEY: json.dumps(header)})


#: Overrides the number of torch threads a process uses (default: the cores it may use).
THREADS_ENV = "VECTORSYNC_TORCH_THREADS"


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, else v1 ``cfs_quota_us``), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def thread_count(share: int = 1) -> int:
    """Torch threads for one of ``share`` workers in this process: ``VECTORSYNC_TORCH_THREADS`` when
    set, else the usable cores divided among them."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    return max(1, usable_cores() // max(1, share))


def small_model_threads() -> int:
    """Threads for tiny models (the tabular autoencoder): one, unless the user set a number. For
    layers this small, thread hand-offs cost more than they save (~10x slower training on two)."""
    return max(1, int(os.environ[THREADS_ENV])) if os.environ.get(THREADS_ENV) else 1


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


def _pack(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    """``value`` as JSON data, its tensors and arrays moved into ``tensors`` under their path."""
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        if _TENSOR in value or not all(isinstance(k, str) for k in value):
            raise TypeError(f"model state at {path!r} has keys that cannot be stored: {list(value)[:5]}")
        return {k: _pack(v, f"{path}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_pack(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"model state at {path!r} holds a {type(value).__name__}; only tensors and JSON data are stored")


def _unpack(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            name = value[_TENSOR]
            if name not in tensors:
                raise ModelFormatError(f"the stored model refers to a tensor {name!r} it does not contain")
            return tensors[name]
        return {k: _unpack(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    return value


def model_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of stored model bytes; ``ModelFormatError`` for anything else."""
    return _payload(_safetensors_header(blob))


def _safetensors_header(blob: bytes) -> dict[str, Any]:
    """The safetensors header: an 8-byte little-endian length, then JSON. Reading it parses JSON,
    nothing that can run code."""
    if len(blob) < 8:
        raise ModelFormatError("the stored model is empty or truncated")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise ModelFormatError("the stored model is not a safetensors file (e.g. an old pickled model)")
    try:
        header = json.loads(blob[8 : 8 + length])
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ModelFormatError("the stored model is not a safetensors file written by vectorsync")
    return header


def _payload(header: dict[str, Any]) -> dict[str, Any]:
    try:
        payload = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError):
        raise ModelFormatError("the stored model is not a safetensors file written by vectorsync") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFormatError(f"the stored model's format is not {MODEL_FORMAT!r}")
    return payload


def load_encoder(blob: bytes, runtime: dict[str, Any] | None = None) -> Encoder:
    """Rebuild an encoder from ``Encoder.to_bytes`` output, whatever its type.

    ``runtime`` holds current values of parameters the encoder lists in ``runtime_params``; they
    replace the stored ones. Raises ``ModelFormatError`` for bytes that are not a stored model.
    """
    from vectorsync.encoders.registry import encoder_class

    header = _safetensors_header(blob)
    payload = _payload(header)
    # A pretrained model's row holds no tensors: reading it then needs no torch (seconds to import).
    tensors = _tensors(blob) if set(header) - {"__metadata__"} else {}
    try:
        cls = encoder_class(str(payload["type"]))
        params = dict(_unpack(payload["params"], tensors))
        params.update({k: v for k, v in (runtime or {}).items() if k in cls.runtime_params})
        encoder = cls(int(payload["dim"]), [str(c) for c in payload["columns"]], params)
        encoder.set_state(_unpack(payload["state"], tensors))
    except (ModelFormatError, DeviceError):
        raise
    except Exception as exc:  # any inconsistency in the stored data: refuse the model, say why
        raise ModelFormatError(f"the stored model cannot be rebuilt: {type(exc).__name__}: {exc}") from None
    return encoder


def _tensors(blob: bytes) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except SafetensorError as exc:
        raise ModelFormatError(f"the stored model's tensors cannot be read: {exc}") from None


def check_finite(vectors: np.ndarray, failures: dict[int, InputError], column: str | None) -> None:
    """Record rows whose output vector is not finite (NaN/inf inputs slipped through)."""
    bad = ~np.isfinite(vectors).all(axis=1)
    for position in np.flatnonzero(bad):
        failures.setdefault(int(position), InputError(column, "encoder produced a non-finite vector"))
