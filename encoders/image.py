"""Image encoder trained on the column's own images: a convolutional autoencoder whose bottleneck
is the embedding.

Shared image helpers live here too (turning a cell's bytes into a checked Pillow image, resizing it
to the model's input, streaming shuffled training batches); ``encoders.face`` uses them so every
image encoder treats inputs the same way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F

from vectorsync.encoders.base import Batches, Encoder, EncodeResult, InputError, Progress, check_finite
from vectorsync.encoders.params import ConvAutoencoderParams, EncoderParams
from vectorsync.errors import ModelError

_DECODE_BATCH = 256
_SHUFFLE_BYTES = 256 * 2**20


def cell_image(
    value: Any,
    column: str,
    min_size: int = 8,
    draft_size: int | None = None,
    max_pixels: int = ConvAutoencoderParams.model_fields["max_pixels"].default,
) -> Image.Image:
    """The decoded image in one cell, or ``InputError`` saying why there is none.

    ``sync`` hands over the encoded bytes (from a ``bytea`` column or a referenced file) or ``None``
    (NULL, or a referenced file that could not be read). EXIF orientation is applied. An image
    whose header declares more than ``max_pixels`` (after a JPEG's reduced draft decode) is refused
    before any pixel is decoded, so one cell takes a bounded amount of memory.
    """
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        raise InputError(column, f"no image data in column {column!r} (NULL or unreadable file)")
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise InputError(column, f"column {column!r} holds {type(value).__name__}, expected encoded image bytes")
    if not value:
        raise InputError(column, f"no image data in column {column!r} (empty value)")
    try:
        image = Image.open(io.BytesIO(value))
        width, height = image.size
        if min(width, height) < min_size:
            raise InputError(
                column, f"image in column {column!r} is {width}x{height} px, below the minimum of {min_size} px a side"
            )
        if draft_size:
            # JPEG decodes at a reduced scale (still at least draft_size a side): large photos load fast.
            image.draft(image.mode, (draft_size, draft_size))
        if image.size[0] * image.size[1] > max_pixels:
            width, height = image.size
            raise InputError(
                column,
                f"image in column {column!r} is {width}x{height} px, above max_pixels = {max_pixels}; "
                "raise max_pixels in the spec to accept it",
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(
            column,
            f"column {column!r} does not hold an image in a format Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP...)",
        ) from None
    except Image.DecompressionBombError as exc:
        raise InputError(column, f"image in column {column!r} is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data
        raise InputError(column, f"corrupt or truncated image in column {column!r}: {exc}") from None


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as greyscale (``channels`` 1) or RGB (3); transparency is flattened onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow clips wide integer/float pixels to 0..255 on convert; rescale to the image's range.
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """``image`` resized to ``size`` x ``size`` as float32 ``(channels, size, size)`` in [0, 1]."""
    image = to_mode(image, channels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()


class ImageEncoderBase(Encoder):
    """What the image and face encoders share: one input column, per-row loading with failures
    recorded, shuffled streaming of training batches."""

    config: dict[str, Any]
    runtime_params = ("max_pixels", "device")

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        if len(self.columns) != 1:
            raise ValueError(f"the {self.type} encoder reads one image column, got {self.columns}")
        self.column = self.columns[0]

    def load(self, value: Any) -> np.ndarray:
        """One cell as the model's input array; raises ``InputError`` for an unusable cell."""
        cfg = self.config
        size = int(cfg["image_size"])
        image = cell_image(value, self.column, int(cfg["min_size"]), draft_size=size, max_pixels=int(cfg["max_pixels"]))
        return to_array(image, size, int(cfg["channels"]))

    def load_column(self, batch: pd.DataFrame) -> tuple[np.ndarray, list[int], dict[int, InputError]]:
        """The loadable rows of ``batch`` stacked, their positions, and why the others failed."""
        if self.column not in batch.columns:
            have = ", ".join(map(str, batch.columns))
            raise KeyError(f"input column {self.column!r} missing from the batch (has: {have})")
        arrays: list[np.ndarray] = []
        positions: list[int] = []
        failures: dict[int, InputError] = {}
        for position, value in enumerate(batch[self.column].tolist()):
            try:
                arrays.append(self.load(value))
                positions.append(position)
            except InputError as exc:
                failures[position] = exc
        size, channels = int(self.config["image_size"]), int(self.config["channels"])
        stacked = np.stack(arrays) if arrays else np.zeros((0, channels, size, size), np.float32)
        return stacked, positions, failures

    network: nn.Module | None

    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        if self.network is None:
            raise ModelError(f"the {self.type} encoder is not trained yet; run `vectorsync train` first")
        images, positions, failures = self.load_column(batch)
        vectors = np.zeros((len(batch), self.dim), dtype=np.float32)
        if positions:
            vectors[positions] = self.vectors(images)
        check_finite(vectors, failures, self.column)
        vectors[list(failures)] = 0.0
        return EncodeResult(vectors, failures)

    def vectors(self, images: np.ndarray) -> np.ndarray:
        """The embedding of each loaded image (``encode`` has already dealt with bad cells)."""
        raise NotImplementedError

    def _build(self) -> nn.Module:
        raise NotImplementedError

    def get_state(self) -> dict[str, Any]:
        if self.network is None:
            raise ModelError(f"the {self.type} encoder is not trained yet; nothing to save")
        weights = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        return {"config": dict(self.config), "weights": weights}

    def set_state(self, state: dict[str, Any]) -> None:
        runtime = {k: self.params[k] for k in self.runtime_params if k in self.params}
        self.config = {**self.options.model_dump(), **state["config"], **runtime}
        network = self._build()
        network.load_state_dict(state["weights"])
        self.network = network.eval()

    def count_rows(self, batches: Batches) -> int:
        """Non-null input cells in ``batches``; sizes the progress total without decoding images."""
        return sum(int(chunk[self.column].notna().sum()) for chunk in batches())

    def shuffled(
        self, items: Iterator[tuple[np.ndarray, ...]], generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Mini-batches drawn through a shuffle buffer, so chunks stream instead of being held.

        ``items`` yields per-chunk aligned arrays (images, and labels for the face encoder). The
        buffer holds ``shuffle_buffer`` images, fewer where they would take over 256 MiB.
        """
        size = int(self.config["batch_size"])
        image_bytes = 4 * int(self.config["channels"]) * int(self.config["image_size"]) ** 2
        buffer_size = max(size, min(int(self.config["shuffle_buffer"]), _SHUFFLE_BYTES // image_bytes))
        buffer: list[tuple[np.ndarray, ...]] = []
        held = 0
        for arrays in items:
            if len(arrays[0]):
                buffer.append(arrays)
                held += len(arrays[0])
            if held >= buffer_size:
                rest = yield from _deal(buffer, size, generator, keep_rest=True)
                buffer, held = [rest], len(rest[0])
        if held:
            yield from _deal(buffer, size, generator, keep_rest=False)


def _deal(
    buffer: list[tuple[np.ndarray, ...]], size: int, generator: torch.Generator, keep_rest: bool
) -> Generator[tuple[torch.Tensor, ...], None, tuple[np.ndarray, ...]]:
    """Yield ``buffer`` shuffled in mini-batches of ``size``; with ``keep_rest``, return the last
    partial batch instead of yielding it."""
    merged = tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*buffer, strict=True))
    order = torch.randperm(len(merged[0]), generator=generator)
    cut = len(order) - len(order) % size if keep_rest else len(order)
    for start in range(0, cut, size):
        rows = order[start : min(start + size, cut)]
        yield tuple(t[rows] for t in merged)
    rest = order[cut:]
    return tuple(t[rest].numpy() for t in merged)


def _downsampled_sizes(size: int) -> list[int]:
    """Spatial sizes after each stride-2 conv until the map is at most 4 pixels a side."""
    sizes = [size]
    while sizes[-1] > 4:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


class _ConvAutoencoderNet(nn.Module):
    def __init__(self, dim: int, size: int, channels: int, width: int) -> None:
        super().__init__()
        sizes = _downsampled_sizes(size)
        widths = [min(width * 2**i, 256) for i in range(len(sizes) - 1)]
        encoder: list[nn.Module] = []
        previous = channels
        for w in widths:
            encoder += [nn.Conv2d(previous, w, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
            previous = w
        self.encoder = nn.Sequential(*encoder)
        self.shape = (previous, sizes[-1], sizes[-1])
        flat = previous * sizes[-1] ** 2
        self.to_code = nn.Linear(flat, dim)
        self.from_code = nn.Sequential(nn.Linear(dim, flat), nn.LeakyReLU(0.1))
        decoder: list[nn.Module] = []
        outs = [*reversed(widths[:-1]), channels]
        for i, w in enumerate(outs):
            small, large = sizes[-1 - i], sizes[-2 - i]
            # A stride-2 transposed conv gives 2*small-1; output_padding restores even sizes exactly.
            decoder.append(
                nn.ConvTranspose2d(previous, w, 3, stride=2, padding=1, output_padding=large - (2 * small - 1))
            )
            if i < len(outs) - 1:
                decoder.append(nn.LeakyReLU(0.1))
            previous = w
        self.decoder = nn.Sequential(*decoder)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_code(self.encoder(images).flatten(1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(images)
        grown = self.from_code(code).view(-1, *self.shape)
        return code, torch.sigmoid(self.decoder(grown))


class ConvAutoencoder(ImageEncoderBase):
    """Encodes an image column with a convolutional autoencoder trained on that column.

    Stride-2 convolutions shrink the image to a small map, a linear layer maps it to the ``dim``-sized
    bottleneck, and transposed convolutions grow it back; training minimises the pixel MSE of the
    reconstruction. The embedding is the bottleneck (not normalised: L2 distance is meaningful).
    """

    type = "conv_autoencoder"
    trainable = True

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        self.config = self.options.model_dump()
        self.network: _ConvAutoencoderNet | None = None

    def _build(self) -> _ConvAutoencoderNet:
        cfg = self.config
        network = _ConvAutoencoderNet(self.dim, int(cfg["image_size"]), int(cfg["channels"]), int(cfg["width"]))
        return network.to(self.device)

    def _images(self, batches: Batches) -> Iterator[tuple[np.ndarray]]:
        for chunk in batches():
            images, _, _ = self.load_column(chunk)
            yield (images,)

    # -- training --------------------------------------------------------------------------------

    def fit(
        self,
        train: Batches,
        holdout: Batches | None = None,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        cfg = self.config
        rows = self.count_rows(train)
        if rows == 0:
            raise InputError(self.column, f"column {self.column!r} has no image data to train the conv_autoencoder on")
        epochs = int(cfg["epochs"])
        total = math.ceil(rows / int(cfg["batch_size"])) * epochs
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = network = self._build()
            optimiser = torch.optim.Adam(network.parameters(), lr=float(cfg["lr"]))
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=float(cfg["lr"]), total_steps=max(total, 1), pct_start=0.2
            )
            step, images_seen = 0, 0
            self.history = []
            for epoch in range(epochs):
                network.train()
                images_seen, epoch_loss = 0, 0.0
                for (images,) in self.shuffled(self._images(train), generator):
                    images = images.to(self.device)
                    _, reconstruction = network(images)
                    loss = F.mse_loss(reconstruction, images)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    if step < total:
                        schedule.step()
                    step += 1
                    images_seen += len(images)
                    epoch_loss += loss.item() * len(images)
                    if progress is not None:
                        progress(min(step, total), total, {"loss": loss.item()})
                if images_seen:
                    self.history.append({"epoch": epoch + 1, "loss": epoch_loss / images_seen})
            if images_seen == 0:
                self.network = None
                raise InputError(
                    self.column, f"no image in column {self.column!r} could be decoded; nothing to train on"
                )
            network.eval()
            metrics = {
                "train_images": float(images_seen),
                "train_unusable_images": float(rows - images_seen),
                "train_reconstruction_mse": self._mse(train),
            }
            if holdout is not None:
                metrics["holdout_reconstruction_mse"] = self._mse(holdout)
        if progress is not None and step < total:
            progress(total, total, {"loss": metrics["train_reconstruction_mse"]})
        return metrics

    @torch.no_grad()
    def _mse(self, batches: Batches) -> float:
        """Mean per-pixel reconstruction error over the decodable images of ``batches``."""
        assert self.network is not None
        total, count = 0.0, 0
        for (images,) in self._images(batches):
            for start in range(0, len(images), _DECODE_BATCH):
                part = torch.from_numpy(images[start : start + _DECODE_BATCH]).to(self.device)
                _, reconstruction = self.network(part)
                total += float(F.mse_loss(reconstruction, part, reduction="sum")) / part[0].numel()
                count += len(part)
        return total / count if count else float("nan")

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def vectors(self, images: np.ndarray) -> np.ndarray:
        assert self.network is not None
        self.network.eval()
        parts = []
        for start in range(0, len(images), _DECODE_BATCH):
            part = torch.from_numpy(images[start : start + _DECODE_BATCH]).to(self.device)
            parts.append(self.network.encode(part).float().cpu().numpy())
        return np.concatenate(parts)

