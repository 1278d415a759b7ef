"""Face encoders: a CNN trained to tell apart the identities in the table's own labelled faces
(VGG-Face recipe, small), and dlib's pretrained face-recognition ResNet.

Both find the face first (unless the spec says the images are already face crops) and embed only
the face; an image with no detectable face is a per-row failure, not a zero vector.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.nn import functional as F

from vectorsync.encoders.base import Batches, EncodeResult, InputError, Progress, check_finite
from vectorsync.encoders.image import (
    ImageEncoderBase,
    cell_image,
    to_array,
    to_mode,
)
from vectorsync.encoders.params import DLIB_DIM, EncoderParams
from vectorsync.errors import MissingExtraError, ModelFileError, SpecError

# The detector scans the image at this working size (longer side): its 24 px window then misses faces
# under ~1/8 of the longer side. Measured on skimage's lfw_subset, astronaut, coins and camera:
# 95% of faces found, 1% of non-faces, no false face in the three photos, ~5 ms a small image.
_DETECT_MIN_SIDE, _DETECT_MAX_SIDE = 96, 192
_DETECT_PAD = 0.25  # tight face crops need context around them for the cascade to fire
_AUC_ROWS = 2000


# -- face detection -----------------------------------------------------------------------------


@functools.cache
def _cascade() -> Any:
    # OpenCV's LBP frontal-face cascade, as bundled with scikit-image: opencv-python-headless 5
    # no longer ships CascadeClassifier or its Haar cascade files.
    try:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade
    except ImportError:
        raise MissingExtraError("face detection", "faces", "scikit-image") from None
    return Cascade(lbp_frontal_face_cascade_filename())


def find_face(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The largest frontal face in ``image`` as a (left, top, right, bottom) box, or None."""
    grey = to_mode(image, 1)
    width, height = grey.size
    longest = max(width, height)
    scale = min(max(longest, _DETECT_MIN_SIDE), _DETECT_MAX_SIDE) / longest
    if scale != 1:
        grey = grey.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    pad = round(_DETECT_PAD * max(grey.size))
    pixels = np.asarray(ImageOps.expand(grey, pad, fill=128))
    hits = _cascade().detect_multi_scale(
        pixels,
        scale_factor=1.2,
        step_ratio=1.5,
        min_size=(24, 24),
        max_size=pixels.shape,
        min_neighbor_number=2,
    )
    if not hits:
        return None
    best = max(hits, key=lambda hit: (hit["width"] * hit["height"], -hit["r"], -hit["c"]))
    left, top = (best["c"] - pad) / scale, (best["r"] - pad) / scale
    return (
        round(left),
        round(top),
        round(left + best["width"] / scale),
        round(top + best["height"] / scale),
    )


def crop_face(image: Image.Image, box: tuple[int, int, int, int], margin: float) -> Image.Image:
    """A square around ``box`` grown by ``margin`` of its side on every side, clipped to the image."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * (1 + 2 * margin)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    clipped = (
        max(0, round(square[0])),
        max(0, round(square[1])),
        min(image.width, round(square[2])),
        min(image.height, round(square[3])),
    )
    return image.crop(clipped)


# -- identity CNN -------------------------------------------------------------------------------


def _block(inputs: int, outputs: int) -> list[nn.Module]:
    return [
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


class _IdentityNet(nn.Module):
    """VGG-style blocks (two 3x3 convs, max-pool) → global average pool → ``dim`` embedding layer."""

    def __init__(self, dim: int, size: int, channels: int, width: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous, blocks = channels, 0
        while size >= 8 and blocks < 4:
            layers += _block(previous, min(width * 2**blocks, 256))
            previous, size, blocks = min(width * 2**blocks, 256), size // 2, blocks + 1
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(previous, dim),
            nn.BatchNorm1d(dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(images - 0.5))


class _CosineClassifier(nn.Module):
    """Cosines between the embedding and one learnt centre per identity; trained with a CosFace
    loss (softmax over scaled cosines, the true identity's cosine lowered by a margin)."""

    def __init__(self, dim: int, identities: int, scale: float, margin: float) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(identities, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.normalize(embedding, dim=-1) @ F.normalize(self.centres, dim=-1).T

    def loss(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = self.margin * F.one_hot(labels, cosines.shape[1]).to(cosines.dtype)
        return F.cross_entropy(self.scale * (cosines - target), labels)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, ±10° rotations, ±10% zooms, ±8% shifts, brightness and contrast."""
    n = len(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-math.pi / 18, math.pi / 18)
    zoom = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift_x, shift_y = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(0.8, 1.2).view(-1, 1, 1, 1)
    brightness = uniform(-0.1, 0.1).view(-1, 1, 1, 1)
    return ((moved - mean) * contrast + mean + brightness).clamp(0, 1)


def verification_auc(vectors: np.ndarray, labels: list[Any]) -> float:
    """ROC AUC of cosine similarity for telling same-identity pairs from different-identity pairs."""
    normed = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    codes = np.unique(np.array([str(label) for label in labels]), return_inverse=True)[1]
    upper = np.triu_indices(len(vectors), k=1)
    scores = (normed @ normed.T)[upper]
    same = (codes[:, None] == codes[None, :])[upper]
    positives, negatives = int(same.sum()), int((~same).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return float((ranks[same].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _label(value: Any) -> Any:
    """A hashable, comparable identity label; None for a missing one."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


class IdentityCNN(ImageEncoderBase):
    """Encodes faces with a CNN trained to classify the identities in ``label_column``.

    The embedding is the L2-normalised output of the layer before the identity classifier
    (VGG-Face style), so faces of one person land close under cosine distance, including people
    the model never saw in training. Training augments every image so the model learns identity,
    not pose, framing or lighting.
    """

    type = "identity_cnn"
    trainable = True

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        self.config = self.options.model_dump()
        if self.config["detect_faces"]:
            _cascade()  # fail now, not on the first image, when scikit-image is missing
        self.network: _IdentityNet | None = None

    def _build(self) -> _IdentityNet:
        cfg = self.config
        network = _IdentityNet(
            self.dim, int(cfg["image_size"]), int(cfg["channels"]), int(cfg["width"]), float(cfg["dropout"])
        )
        return network.to(self.device)

    def load(self, value: Any) -> np.ndarray:
        cfg = self.config
        size, detect = int(cfg["image_size"]), bool(cfg["detect_faces"])
        # A face may fill a small part of a photo: decode large JPEGs at a scale that still crops well.
        image = cell_image(
            value,
            self.column,
            int(cfg["min_size"]),
            draft_size=max(640, 4 * size) if detect else size,
            max_pixels=int(cfg["max_pixels"]),
        )
        if detect:
            box = find_face(image)
            if box is None:
                raise InputError(self.column, f"no face detected in the image in column {self.column!r}")
            image = crop_face(image, box, float(cfg["face_margin"]))
            if min(image.size) < 2:  # the detection lay in the padding around the image
                raise InputError(self.column, f"no face detected in the image in column {self.column!r}")
        return to_array(image, size, int(cfg["channels"]))

    def _labelled(self, batches: Batches, classes: dict[Any, int] | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """Per chunk: the loadable faces with a label, and their labels (as class indices if given)."""
        label_column = self.config["label_column"]
        for chunk in batches():
            if label_column not in chunk.columns:
                raise KeyError(f"label column {label_column!r} missing from the training batch")
            labels = [_label(v) for v in chunk[label_column].tolist()]
            keep = [i for i, label in enumerate(labels) if label is not None and (classes is None or label in classes)]
            images, positions, _ = self.load_column(chunk.iloc[keep])
            kept = [labels[keep[p]] for p in positions]
            if classes is None:
                yield images, np.array(kept, dtype=object)
            else:
                yield images, np.array([classes[label] for label in kept], dtype=np.int64)

    def _identities(self, batches: Batches) -> tuple[list[Any], int]:
        label_column = self.config["label_column"]
        seen: set[Any] = set()
        rows = 0
        for chunk in batches():
            if label_column not in chunk.columns:
                raise KeyError(f"label column {label_column!r} missing from the training batch")
            for value, label in zip(chunk[self.column].tolist(), chunk[label_column].tolist(), strict=True):
                label = _label(label)
                if label is not None and value is not None:
                    seen.add(label)
                    rows += 1
        return sorted(seen, key=lambda label: (type(label).__name__, str(label))), rows

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
        if not cfg["label_column"]:
            raise ValueError("the identity_cnn encoder trains on identities: set 'label_column' in the spec")
        identities, rows = self._identities(train)
        if len(identities) < 2:
            raise InputError(
                self.column,
                f"the identity_cnn encoder needs faces of at least 2 identities in {cfg['label_column']!r}, "
                f"found {len(identities)}"
            )
        classes = {label: i for i, label in enumerate(identities)}
        epochs = int(cfg["epochs"])
        total = math.ceil(rows / int(cfg["batch_size"])) * epochs
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = network = self._build()
            head = _CosineClassifier(
                self.dim, len(identities), float(cfg["cosine_scale"]), float(cfg["cosine_margin"])
            ).to(self.device)
            parameters = [*network.parameters(), *head.parameters()]
            optimiser = torch.optim.AdamW(parameters, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=float(cfg["lr"]), total_steps=max(total, 1), pct_start=0.2
            )
            step, correct, seen, last_loss = 0, 0, 0, float("nan")
            self.history = []
            for epoch in range(epochs):
                network.train()
                correct, seen, epoch_loss = 0, 0, 0.0
                for images, labels in self.shuffled(self._labelled(train, classes), generator):
                    if len(images) < 2:  # batch norm needs two samples
                        continue
                    if cfg["augment"]:
                        images = _augment(images, generator)
                    images, labels = images.to(self.device), labels.to(self.device)
                    cosines = head(network(images))
                    loss = head.loss(cosines, labels)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    if step < total:
                        schedule.step()
                    step, last_loss = step + 1, loss.item()
                    correct += int((cosines.argmax(1) == labels).sum())
                    seen += len(labels)
                    epoch_loss += last_loss * len(labels)
                    if progress is not None:
                        progress(min(step, total), total, {"loss": last_loss})
                if seen:
                    self.history.append({"epoch": epoch + 1, "loss": epoch_loss / seen})
            if seen == 0:
                self.network = None
                raise InputError(
                    self.column,
                    f"no usable face in column {self.column!r} (none decoded or detected); nothing to train on"
                )
            network.eval()
            metrics = {
                "identities": float(len(identities)),
                "train_faces": float(seen),
                "train_unusable_images": float(rows - seen),
                "train_accuracy": correct / seen,
            }
            if holdout is not None:
                metrics.update(self._holdout_metrics(holdout, head, classes))
        if progress is not None and step < total:
            progress(total, total, {"loss": last_loss})
        return metrics

    @torch.no_grad()
    def _holdout_metrics(self, holdout: Batches, head: _CosineClassifier, classes: dict[Any, int]) -> dict[str, float]:
        """Identity accuracy on holdout faces of people seen in training, and verification ROC AUC
        (same person or not, by cosine) over up to 2,000 labelled holdout faces."""
        assert self.network is not None
        correct, known = 0, 0
        vectors: list[np.ndarray] = []
        labels: list[Any] = []
        for images, names in self._labelled(holdout):
            if len(images) == 0:
                continue
            embedding = self.network(torch.from_numpy(images).to(self.device))
            index = [i for i, name in enumerate(names) if name in classes]
            if index:
                predicted = head(embedding[index]).argmax(1).cpu().numpy()
                correct += int((predicted == np.array([classes[names[i]] for i in index])).sum())
                known += len(index)
            room = _AUC_ROWS - len(labels)
            if room > 0:
                vectors.append(F.normalize(embedding[:room], dim=-1).cpu().numpy())
                labels.extend(names[:room])
        metrics = {"holdout_known_faces": float(known)}
        if known:
            metrics["holdout_accuracy"] = correct / known
        if labels:
            metrics["holdout_verification_auc"] = verification_auc(np.concatenate(vectors), labels)
        return metrics

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def vectors(self, images: np.ndarray) -> np.ndarray:
        assert self.network is not None
        self.network.eval()
        parts = []
        for start in range(0, len(images), 256):
            part = torch.from_numpy(images[start : start + 256]).to(self.device)
            parts.append(F.normalize(self.network(part), dim=-1).float().cpu().numpy())
        return np.concatenate(parts)



# -- pretrained dlib ----------------------------------------------------------------------------


@functools.cache
def _dlib_models() -> tuple[Any, Any, Any, Any]:
    """dlib, its HOG face detector, the 5-point landmark model and the face-recognition ResNet."""
    try:
        import dlib
    except ImportError:
        raise MissingExtraError("the dlib face encoder", "faces", "dlib-bin") from None
    # Located without importing: face_recognition_models' __init__ needs pkg_resources (setuptools < 81).
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("the dlib face encoder", "faces", "face_recognition_models")
    models = os.path.join(next(iter(spec.submodule_search_locations)), "models")
    landmarks = os.path.join(models, "shape_predictor_5_face_landmarks.dat")
    resnet = os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat")
    for path in (landmarks, resnet):
        if not os.path.exists(path):
            raise ModelFileError(
                f"face_recognition_models lacks {os.path.basename(path)}; "
                "reinstall it: pip install --force-reinstall face_recognition_models"
            )
    return (
        dlib,
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(landmarks),
        dlib.face_recognition_model_v1(resnet),
    )


class DlibFaceEncoder(ImageEncoderBase):
    """dlib's pretrained face-recognition ResNet (128-d; faces of one person lie within ~0.6 L2).

    Faces are found with dlib's HOG detector (unless ``detect_faces`` is false: the whole image is
    the face), aligned with the 5-point landmark model and embedded from a 150 px RGB chip.
    Pretrained: ``fit`` trains nothing.
    """

    type = "dlib"
    trainable = False

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        if dim != DLIB_DIM:
            raise SpecError(
                f"the dlib face encoder makes {DLIB_DIM}-dimensional vectors; set dim = {DLIB_DIM} (got {dim})"
            )
        self.config = self.options.model_dump()
        self._dlib, self._detector, self._landmarks, self._resnet = _dlib_models()

    def fit(
        self,
        train: Batches,
        holdout: Batches | None = None,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        return {}

    def describe(self, value: Any) -> np.ndarray:
        """One cell's 128-d face descriptor; raises ``InputError`` for an unusable cell."""
        cfg = self.config
        max_side = int(cfg["max_side"])
        image = cell_image(
            value, self.column, int(cfg["min_size"]), draft_size=max_side, max_pixels=int(cfg["max_pixels"])
        )
        image = to_mode(image, 3)
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        height, width = pixels.shape[:2]
        try:
            if cfg["detect_faces"]:
                # Upsampling once lets the HOG detector (80 px window) find faces down to ~40 px.
                faces = self._detector(pixels, 1 if max(width, height) <= 640 else 0)
                if len(faces) == 0:
                    raise InputError(self.column, f"no face detected in the image in column {self.column!r}")
                box = max(faces, key=lambda r: (r.area(), -r.top(), -r.left()))
            else:
                box = self._dlib.rectangle(0, 0, width - 1, height - 1)
            shape = self._landmarks(pixels, box)
            descriptor = self._resnet.compute_face_descriptor(pixels, shape, int(cfg["num_jitters"]))
        except RuntimeError as exc:
            raise InputError(self.column, f"dlib could not embed the face in column {self.column!r}: {exc}") from None
        return np.asarray(descriptor, dtype=np.float32)

    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        vectors = np.zeros((len(batch), self.dim), dtype=np.float32)
        if self.column not in batch.columns:
            have = ", ".join(map(str, batch.columns))
            raise KeyError(f"input column {self.column!r} missing from the batch (has: {have})")
        failures: dict[int, InputError] = {}
        for position, value in enumerate(batch[self.column].tolist()):
            try:
                vectors[position] = self.describe(value)
            except InputError as exc:
                failures[position] = exc
        check_finite(vectors, failures, self.column)
        vectors[list(failures)] = 0.0
        return EncodeResult(vectors, failures)

    def get_state(self) -> dict[str, Any]:
        return {"model": "dlib_face_recognition_resnet_model_v1", "landmarks": "shape_predictor_5_face_landmarks"}

    def set_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the weights come with the face_recognition_models package."""
