"""Tabular modality: pandas preprocessing plus a symmetric MLP autoencoder.

Numeric columns are standardised, SQL NULLs imputed with the training mean plus a missing-value
indicator; categorical columns (text, booleans, anything non-numeric) are one-hot encoded over
their most frequent values with "other" and "missing" buckets. Layers shrink to the ``dim``
bottleneck and grow back; the model learns to reconstruct the preprocessed row and the bottleneck
is the embedding. NaN or infinite values (as opposed to NULLs) are rejected per row and column.
Extreme finite values (1e308) neither overflow the statistics nor vanish: the mean and standard
deviation are taken over the values winsorised at their 0.5th and 99.5th percentiles, and a
standardised value is clipped to ±``CLIP`` standard deviations.
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from vectorsync.encoders.base import (
    Batches,
    Encoder,
    EncodeResult,
    InputError,
    Progress,
    small_model_threads,
    torch_threads,
)
from vectorsync.encoders.params import AutoencoderParams, EncoderParams
from vectorsync.errors import ModelError

MAX_CATEGORIES = 50
#: Standardised values are clipped to this many standard deviations: a far outlier still embeds,
#: near the edge of its column's range, instead of overflowing the model.
CLIP = 10.0


@dataclass
class Preprocessor:
    """Fitted column transforms; plain data so it is saved with the model."""

    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std)
    indicators: list[str] = field(default_factory=list)  # numeric columns that get a missing flag
    categories: dict[str, list[str]] = field(default_factory=dict)  # column -> kept values

    @property
    def width(self) -> int:
        return len(self.numeric) + len(self.indicators) + sum(len(v) + 2 for v in self.categories.values())

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict[int, InputError]]:
        failures: dict[int, InputError] = {}
        parts: list[np.ndarray] = []
        # one conversion of the whole frame: pandas' per-column access costs more than a row's model
        cells = frame.to_numpy(dtype=object)
        at = {column: i for i, column in enumerate(frame.columns.tolist())}
        for column, (mean, std) in self.numeric.items():
            values, bad = _numeric(cells[:, at[column]])
            for position, reason in bad.items():
                failures.setdefault(position, InputError(column, reason))
            missing = np.isnan(values)
            with np.errstate(over="ignore", invalid="ignore"):
                scaled = np.clip((values - mean) / std, -CLIP, CLIP)
            parts.append(np.where(missing, 0.0, scaled)[:, None])
            if column in self.indicators:
                parts.append(missing.astype(np.float64)[:, None])
        for column, kept in self.categories.items():
            index = {value: i for i, value in enumerate(kept)}
            onehot = np.zeros((len(frame), len(kept) + 2))
            for row, value in enumerate(cells[:, at[column]].tolist()):
                if _is_null(value):
                    onehot[row, len(kept) + 1] = 1.0
                else:
                    onehot[row, index.get(_category(value), len(kept))] = 1.0
            parts.append(onehot)
        matrix = np.hstack(parts).astype(np.float32) if parts else np.zeros((len(frame), 0), np.float32)
        return matrix, failures


def _robust_moments(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of ``values`` winsorised at the 0.5th and 99.5th percentiles,
    computed around the median so that values near the float64 limit cannot overflow them."""
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.quantile(values, [0.005, 0.995], method="nearest")
    centre = float(np.median(values))
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.clip(values, low, high) - centre
        mean = centre + float(spread.mean())
        std = float(spread.std())
    if not math.isfinite(mean):
        mean = centre
    return mean, std if math.isfinite(std) and std > 1e-12 else 1.0


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT


def _category(value: Any) -> str:
    return str(value)


def _numeric(values: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Floats with NaN for NULL (``values``: one column's cells as objects); non-finite or
    non-numeric values are reported, not imputed."""
    null = np.fromiter((_is_null(v) for v in values), dtype=bool, count=len(values))
    try:
        out = np.where(null, np.nan, values).astype(np.float64)
    except (TypeError, ValueError, decimal.InvalidOperation):
        return _numeric_slow(values)
    bad_positions = np.flatnonzero(~null & ~np.isfinite(out))
    bad = {int(p): f"value {values[p]!r} is not finite (NaN or infinity)" for p in bad_positions}
    out[bad_positions] = np.nan
    return out, bad


def _numeric_slow(values: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    out = np.empty(len(values), dtype=np.float64)
    bad: dict[int, str] = {}
    for position, value in enumerate(values):
        if _is_null(value):
            out[position] = np.nan
            continue
        try:
            number = _as_float(value)
        except (TypeError, ValueError, decimal.InvalidOperation):
            bad[position] = f"value {value!r} is not numeric"
            out[position] = np.nan
            continue
        if not math.isfinite(number):
            bad[position] = f"value {value!r} is not finite (NaN or infinity)"
            out[position] = np.nan
        else:
            out[position] = number
    return out, bad


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, dt.date):
        return float(value.toordinal())
    return float(value)


def _is_numeric_column(values: list[Any]) -> bool:
    seen = False
    for value in values:
        if _is_null(value):
            continue
        if isinstance(value, bool | str | bytes):
            return False
        if not isinstance(value, int | float | decimal.Decimal | np.number | dt.date):
            return False
        seen = True
    return seen


class _Autoencoder(nn.Module):
    def __init__(self, width: int, dim: int, hidden: list[int]) -> None:
        super().__init__()
        sizes = [width, *hidden, dim]
        encoder: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            encoder += [nn.Linear(a, b), nn.GELU()]
        self.encoder = nn.Sequential(*encoder[:-1])  # linear bottleneck
        decoder: list[nn.Module] = []
        back = sizes[::-1]
        for a, b in itertools.pairwise(back):
            decoder += [nn.Linear(a, b), nn.GELU()]
        self.decoder = nn.Sequential(*decoder[:-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


class TabularAutoencoder(Encoder):
    """Parameters: ``encoders.params.AutoencoderParams``."""

    type = "autoencoder"
    options: AutoencoderParams

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        self.pre = Preprocessor()
        self.model: _Autoencoder | None = None

    def _hidden(self, width: int) -> list[int]:
        if self.options.hidden is not None:
            return list(self.options.hidden)
        return [max(2 * self.dim, min(256, 2 * width))]

    def _fit_preprocessing(self, train: Batches) -> None:
        numbers_of: dict[str, list[np.ndarray]] = {}
        missing: set[str] = set()
        counts: dict[str, dict[str, int]] = {}
        kinds: dict[str, bool] = {}
        for chunk in train():
            for column in self.columns:
                if column not in chunk.columns:
                    raise ValueError(f"column {column!r} is missing from the training data")
                values = chunk[column].tolist()
                if column not in kinds:
                    kinds[column] = _is_numeric_column(values)
                if kinds[column]:
                    numbers, _ = _numeric(chunk[column].to_numpy(dtype=object))
                    finite = numbers[np.isfinite(numbers)]
                    numbers_of.setdefault(column, []).append(finite)
                    if finite.size < numbers.size:
                        missing.add(column)
                else:
                    bucket = counts.setdefault(column, {})
                    for value in values:
                        if not _is_null(value):
                            key = _category(value)
                            bucket[key] = bucket.get(key, 0) + 1
        pre = Preprocessor()
        for column in self.columns:
            if kinds.get(column):
                pre.numeric[column] = _robust_moments(np.concatenate(numbers_of[column]))
                if column in missing:
                    pre.indicators.append(column)
            else:
                ranked = sorted(counts.get(column, {}).items(), key=lambda kv: (-kv[1], kv[0]))
                pre.categories[column] = [k for k, _ in ranked[:MAX_CATEGORIES]]
        self.pre = pre

    def _matrix(self, batches: Batches) -> np.ndarray:
        parts = []
        for chunk in batches():
            matrix, failures = self.pre.transform(chunk)
            if failures:
                keep = np.array([i not in failures for i in range(len(matrix))])
                matrix = matrix[keep]
            parts.append(matrix)
        return np.vstack(parts) if parts else np.zeros((0, self.pre.width), np.float32)

    def fit(
        self,
        train: Batches,
        holdout: Batches | None = None,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        with torch_threads(self._threads()):
            return self._fit(train, holdout, seed, progress)

    def _threads(self) -> int:
        return self.options.threads or small_model_threads()

    def _fit(self, train: Batches, holdout: Batches | None, seed: int, progress: Progress | None) -> dict[str, float]:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self._fit_preprocessing(train)
        device = self.device
        data = torch.from_numpy(self._matrix(train)).to(device)
        if len(data) == 0:
            raise InputError(None, "no usable training rows (every row had invalid values)")
        self.model = _Autoencoder(self.pre.width, self.dim, self._hidden(self.pre.width)).to(device)
        batch_size = self.options.batch_size
        steps_per_epoch = math.ceil(len(data) / batch_size)
        epochs = self.options.epochs or max(5, min(200, 3000 // steps_per_epoch))
        noise = self.options.noise
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.options.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        total, step = epochs * steps_per_epoch, 0
        self.model.train()
        self.history = []
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            epoch_loss = 0.0
            for start in range(0, len(data), batch_size):
                x = data[order[start : start + batch_size]]
                # drawn on the CPU generator whatever the device: the same seed gives the same model
                noisy = x + noise * torch.randn(x.shape, generator=generator).to(device)
                _, recon = self.model(noisy)
                loss = nn.functional.mse_loss(recon, x)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                epoch_loss += float(loss.detach()) * len(x)
                if progress and (step % 10 == 0 or step == total):
                    progress(step, total, {"loss": float(loss.detach())})
            self.history.append({"epoch": epoch + 1, "loss": epoch_loss / len(data)})
        self.model.eval()
        metrics = {"train_reconstruction_mse": self._mse(data), "train_rows": float(len(data))}
        if holdout is not None:
            held = torch.from_numpy(self._matrix(holdout)).to(device)
            if len(held):
                metrics["holdout_reconstruction_mse"] = self._mse(held)
                metrics["holdout_rows"] = float(len(held))
        return metrics

    def _mse(self, data: torch.Tensor) -> float:
        assert self.model is not None
        with torch.no_grad():
            _, recon = self.model(data)
            return float(nn.functional.mse_loss(recon, data))

    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        with torch_threads(self._threads()):
            return self._encode(batch)

    def _encode(self, batch: pd.DataFrame) -> EncodeResult:
        if self.model is None:
            raise ModelError("the tabular autoencoder is not trained; run `vectorsync train` first")
        missing = [c for c in self.columns if c not in batch.columns]
        if missing:
            raise ValueError(f"input columns missing from the batch: {', '.join(missing)}")
        matrix, failures = self.pre.transform(batch)
        with torch.no_grad():
            vectors = self.model.encoder(torch.from_numpy(matrix).to(self.device)).cpu().numpy().astype(np.float32)
        return EncodeResult(vectors, failures)

    def get_state(self) -> dict[str, Any]:
        assert self.model is not None
        return {
            "numeric": self.pre.numeric,
            "indicators": self.pre.indicators,
            "categories": self.pre.categories,
            "hidden": self._hidden(self.pre.width),
            "weights": self.model.state_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.pre = Preprocessor(state["numeric"], state["indicators"], state["categories"])
        self.model = _Autoencoder(self.pre.width, self.dim, state["hidden"])
        self.model.load_state_dict(state["weights"])
        self.model.to(self.device).eval()
