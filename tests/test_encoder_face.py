"""The face encoders, at the encoder level (no database).

Data: no labelled face set ships offline with our dependencies (sklearn's Olivetti and LFW-people
loaders download; scikit-image's ``lfw_subset`` is 100 unlabelled 25x25 faces plus 100 non-face
patches). So identity training and verification use procedurally drawn faces (``tests/face_data.py``).
Detection is tested on
the real photos in ``lfw_subset`` and ``skimage.data.astronaut``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps
from sklearn.metrics import roc_auc_score

from tests.face_data import COLUMN, LABEL, encoded, lfw, people
from vectorsync.encoders import face
from vectorsync.encoders.base import load_encoder
from vectorsync.encoders.face import DlibFaceEncoder, IdentityCNN, find_face
from vectorsync.encoders.registry import encoder_class

PARAMS: dict[str, Any] = {
    "image_size": 32,
    "channels": 1,
    "detect_faces": False,  # drawn faces are crops already, and no real detector would fire on them
    "label_column": LABEL,
    "epochs": 8,
    "width": 16,
    "batch_size": 32,
}
#: skimage's astronaut photo: where her face is (left, top, right, bottom), as dlib's detector puts it.
ASTRONAUT_FACE = (179, 83, 266, 170)


# -- data ---------------------------------------------------------------------------------------


def chunks(frame: pd.DataFrame, size: int = 128) -> Callable[[], Iterator[pd.DataFrame]]:
    return lambda: (frame.iloc[start : start + size] for start in range(0, len(frame), size))


def verification_auc(vectors: np.ndarray, labels: pd.Series) -> float:
    labels = labels.to_numpy()
    upper = np.triu_indices(len(vectors), k=1)
    same = (labels[:, None] == labels[None, :])[upper]
    return float(roc_auc_score(same, (vectors @ vectors.T)[upper]))


@pytest.fixture(scope="module")
def training_set() -> pd.DataFrame:
    return people(40, 10, seed=1)


@pytest.fixture(scope="module")
def unseen() -> pd.DataFrame:
    return people(20, 10, seed=2, first_id=1000)


@pytest.fixture(scope="module")
def trained(training_set: pd.DataFrame, unseen: pd.DataFrame) -> tuple[IdentityCNN, dict[str, float]]:
    # Holdout: unseen people, plus new photos of 10 training people (scores identity accuracy).
    known_again = people(10, 5, seed=1, photo_seed=99)
    encoder = IdentityCNN(64, [COLUMN], PARAMS)
    metrics = encoder.fit(chunks(training_set), chunks(pd.concat([unseen, known_again])), seed=0)
    return encoder, metrics


# -- identity CNN ---------------------------------------------------------------------------------


def test_registry_names_the_face_encoders() -> None:
    assert encoder_class("identity_cnn") is IdentityCNN
    assert encoder_class("dlib") is DlibFaceEncoder


def test_unseen_people_are_verified_by_cosine(trained: tuple, unseen: pd.DataFrame) -> None:
    encoder, _ = trained
    auc = verification_auc(encoder.encode(unseen).vectors, unseen[LABEL])

    untrained = IdentityCNN(64, [COLUMN], PARAMS)
    torch.manual_seed(0)
    untrained.network = untrained._build().eval()
    baseline = verification_auc(untrained.encode(unseen).vectors, unseen[LABEL])
    print(
        f"\nidentity CNN, 20 people never seen in training: same/different ROC AUC {auc:.3f} "
        f"(untrained network {baseline:.3f}, chance 0.5)"
    )
    assert auc > 0.85
    assert auc > baseline + 0.1


def test_fit_reports_identity_metrics(trained: tuple) -> None:
    _, metrics = trained
    print(f"\nidentity CNN fit metrics: {metrics}")
    assert metrics["identities"] == 40
    assert metrics["train_faces"] == 400
    assert metrics["holdout_known_faces"] == 50
    assert metrics["holdout_accuracy"] > 5 / 40  # well above chance among 40 identities
    assert metrics["holdout_verification_auc"] > 0.8


def test_vectors_are_unit_length_float32(trained: tuple, unseen: pd.DataFrame) -> None:
    encoder, _ = trained
    result = encoder.encode(unseen.iloc[:9])
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (9, 64)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_the_same_seed_gives_the_same_vectors_and_a_saved_model_reproduces_them(unseen: pd.DataFrame) -> None:
    small = people(6, 4, seed=3)
    params = {**PARAMS, "epochs": 2}

    def fitted(seed: int) -> IdentityCNN:
        encoder = IdentityCNN(16, [COLUMN], params)
        encoder.fit(chunks(small, 10), seed=seed)
        return encoder

    first = fitted(5)
    vectors = first.encode(unseen.iloc[:20]).vectors
    assert np.array_equal(vectors, fitted(5).encode(unseen.iloc[:20]).vectors)
    assert not np.allclose(vectors, fitted(6).encode(unseen.iloc[:20]).vectors)
    restored = load_encoder(first.to_bytes())
    assert isinstance(restored, IdentityCNN)
    assert np.array_equal(restored.encode(unseen.iloc[:20]).vectors, vectors)


def test_training_needs_labels_of_two_people() -> None:
    one_person = people(1, 4, seed=4)
    with pytest.raises(ValueError, match="set 'label_column'"):
        IdentityCNN(16, [COLUMN], {**PARAMS, "label_column": None}).fit(chunks(one_person), seed=0)
    with pytest.raises(ValueError, match="at least 2 identities"):
        IdentityCNN(16, [COLUMN], PARAMS).fit(chunks(one_person), seed=0)


def test_a_bad_input_fails_its_row_only(trained: tuple, unseen: pd.DataFrame) -> None:
    encoder, _ = trained
    good = unseen[COLUMN].tolist()[:2]
    batch = pd.DataFrame({COLUMN: [good[0], None, b"GIF89a garbage", encoded(Image.new("L", (5, 5))), good[1]]})
    result = encoder.encode(batch)
    assert sorted(result.failures) == [1, 2, 3]
    assert all(error.column == COLUMN for error in result.failures.values())
    assert "no image data" in result.failures[1].message
    assert "5x5 px" in result.failures[3].message
    assert np.allclose(np.linalg.norm(result.vectors[[0, 4]], axis=1), 1.0, atol=1e-5)


# -- face detection ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detecting() -> IdentityCNN:
    """An identity CNN that detects faces, trained (briefly: the detection path is under test) on lfw faces."""
    faces, _ = lfw(upscale_to=64)
    frame = pd.DataFrame({COLUMN: faces, LABEL: [i % 4 for i in range(len(faces))]})
    encoder = IdentityCNN(16, [COLUMN], {**PARAMS, "detect_faces": True, "epochs": 1})
    encoder.fit(chunks(frame), seed=0)
    return encoder


def test_most_lfw_faces_are_detected_and_few_non_faces(detecting: IdentityCNN) -> None:
    rates = {}
    for upscale in (None, 64):
        faces, non_faces = lfw(upscale)
        start = time.perf_counter()
        on_faces = detecting.encode(pd.DataFrame({COLUMN: faces})).failures
        on_non_faces = detecting.encode(pd.DataFrame({COLUMN: non_faces})).failures
        per_image = (time.perf_counter() - start) / 200 * 1000
        rates[upscale] = (1 - len(on_faces) / 100, 1 - len(on_non_faces) / 100)
        print(
            f"\nlfw_subset at {upscale or 25} px: faces detected {rates[upscale][0]:.2f}, "
            f"non-faces taken for faces {rates[upscale][1]:.2f}, {per_image:.1f} ms/image with encoding"
        )
    for detected, false_alarms in rates.values():
        assert detected >= 0.9
        assert false_alarms <= 0.05


def test_an_image_without_a_face_fails_with_no_face_detected(detecting: IdentityCNN) -> None:
    rng = np.random.default_rng(0)
    faces, _ = lfw(upscale_to=64)
    batch = pd.DataFrame({
        COLUMN: [
            faces[0],
            encoded(Image.fromarray(skimage.data.coins())),
            encoded(Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8))),
            encoded(Image.new("RGB", (64, 64), (90, 120, 200))),
        ]
    })  # fmt: skip
    result = detecting.encode(batch)
    assert sorted(result.failures) == [1, 2, 3]
    for error in result.failures.values():
        assert error.column == COLUMN
        assert "no face detected" in error.message
    assert np.isclose(np.linalg.norm(result.vectors[0]), 1.0, atol=1e-5)


def test_face_detection_without_scikit_image_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    face._cascade.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage.feature", None)  # importing it now raises ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install 'vectorsync\[faces\]'"):
            IdentityCNN(16, [COLUMN], {**PARAMS, "detect_faces": True})
        IdentityCNN(16, [COLUMN], PARAMS)  # crops need no detector
    finally:
        face._cascade.cache_clear()


def test_the_face_in_a_photo_is_found_where_it_is() -> None:
    box = find_face(Image.fromarray(skimage.data.astronaut()))
    assert box is not None
    left, top = max(box[0], ASTRONAUT_FACE[0]), max(box[1], ASTRONAUT_FACE[1])
    right, bottom = min(box[2], ASTRONAUT_FACE[2]), min(box[3], ASTRONAUT_FACE[3])
    overlap = max(0, right - left) * max(0, bottom - top)

    def area(b: tuple[int, ...]) -> int:
        return (b[2] - b[0]) * (b[3] - b[1])

    assert overlap / (area(box) + area(ASTRONAUT_FACE) - overlap) > 0.5


def test_face_encode_throughput(trained: tuple, detecting: IdentityCNN, unseen: pd.DataFrame) -> None:
    encoder, _ = trained
    rng = np.random.default_rng(0)
    photos = pd.DataFrame(
        {COLUMN: [encoded(Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))) for _ in range(64)]}
    )
    rates = {}
    for name, model, frame in (("crops 48 px", encoder, unseen), ("detection on 128 px photos", detecting, photos)):
        start = time.perf_counter()
        result = model.encode(frame)
        rates[name] = len(frame) / (time.perf_counter() - start)
        # speed is reported, and measured against a baseline in benchmarks/; never asserted in tests
        assert result.vectors.shape[0] == len(frame)
    print("\nidentity CNN encode: " + ", ".join(f"{name} {rate:.0f} images/s" for name, rate in rates.items()))


# -- pretrained dlib --------------------------------------------------------------------------------


def test_dlib_without_its_packages_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    face._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install 'vectorsync\[faces\]'"):
            DlibFaceEncoder(128, [COLUMN], {})
    finally:
        face._dlib_models.cache_clear()


def test_dlib_vectors_are_128_dimensional() -> None:
    with pytest.raises(ValueError, match="set dim = 128"):
        DlibFaceEncoder(64, [COLUMN], {})


needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None,
    reason="the faces extra (dlib-bin, face_recognition_models) is not installed",
)


@pytest.fixture(scope="module")
def dlib_encoder() -> DlibFaceEncoder:
    return DlibFaceEncoder(
        128, [COLUMN], {"image_size": 150, "channels": 3, "detect_faces": True, "label_column": None}
    )


@needs_dlib
def test_dlib_puts_a_face_nearer_its_mirror_image_than_other_faces(dlib_encoder: DlibFaceEncoder) -> None:
    crops = DlibFaceEncoder(128, [COLUMN], {"detect_faces": False})
    faces = [Image.fromarray((a * 255).astype(np.uint8)).resize((150, 150)) for a in skimage.data.lfw_subset()[:12]]
    originals = crops.encode(pd.DataFrame({COLUMN: [encoded(f) for f in faces]}))
    mirrors = crops.encode(pd.DataFrame({COLUMN: [encoded(ImageOps.mirror(f)) for f in faces]}))
    assert originals.failures == {} and mirrors.failures == {}
    distances = np.linalg.norm(originals.vectors[:, None] - mirrors.vectors[None], axis=2)
    own = np.diag(distances)
    others = np.where(np.eye(12, dtype=bool), np.inf, distances).min(axis=1)
    print(f"\ndlib: face to own mirror {own.mean():.3f} L2 on average, to nearest other face {others.mean():.3f}")
    assert (own < others).all()


@needs_dlib
def test_dlib_finds_the_face_in_a_photo_and_fails_rows_without_one(dlib_encoder: DlibFaceEncoder) -> None:
    photos = [encoded(Image.fromarray(skimage.data.astronaut())), encoded(Image.fromarray(skimage.data.coins()))]
    batch = pd.DataFrame({COLUMN: [*photos, None]})
    result = dlib_encoder.encode(batch)
    assert sorted(result.failures) == [1, 2]
    assert "no face detected" in result.failures[1].message
    assert result.failures[1].column == COLUMN
    assert result.vectors.shape == (3, 128) and result.vectors.dtype == np.float32
    assert 0.5 < np.linalg.norm(result.vectors[0]) < 1.5  # dlib descriptors are near unit length


@needs_dlib
def test_dlib_is_pretrained_and_round_trips(dlib_encoder: DlibFaceEncoder) -> None:
    assert DlibFaceEncoder.trainable is False
    assert dlib_encoder.fit(chunks(pd.DataFrame({COLUMN: []}))) == {}
    batch = pd.DataFrame({COLUMN: [encoded(Image.fromarray(skimage.data.astronaut()))]})
    restored = load_encoder(dlib_encoder.to_bytes())
    assert isinstance(restored, DlibFaceEncoder)
    assert np.array_equal(restored.encode(batch).vectors, dlib_encoder.encode(batch).vectors)
