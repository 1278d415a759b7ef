"""Synthetic labelled faces and scikit-image's real ``lfw_subset``, as PNG bytes, for the face tests.

No labelled face set ships offline with our dependencies, so identities are drawn procedurally: each
identity is a fixed set of facial proportions (face shape, eyes, brows, nose, mouth, hair, glasses,
beard), and each image of it varies pose, framing, expression, lighting, blur and noise.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import skimage.data
from PIL import Image, ImageDraw, ImageFilter

COLUMN, LABEL = "portrait", "person"


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def draw_identity(rng: np.random.Generator) -> dict[str, Any]:
    """The proportions that make one synthetic person."""
    return {
        "face_w": rng.uniform(0.5, 0.75), "face_h": rng.uniform(0.68, 0.92), "skin": rng.uniform(110, 225),
        "hair": rng.uniform(10, 140), "style": int(rng.integers(4)), "eye_y": rng.uniform(0.4, 0.5),
        "eye_dx": rng.uniform(0.1, 0.2), "eye_r": rng.uniform(0.025, 0.055), "brow_tilt": rng.uniform(-0.04, 0.04),
        "brow_w": rng.uniform(1, 4), "nose": rng.uniform(0.07, 0.17), "nose_w": rng.uniform(0.03, 0.08),
        "mouth_y": rng.uniform(0.66, 0.8), "mouth_w": rng.uniform(0.1, 0.28), "glasses": rng.random() < 0.3,
        "beard": rng.random() < 0.25, "ears": rng.uniform(0.0, 0.06),
    }  # fmt: skip


def draw_face(p: dict[str, Any], rng: np.random.Generator, size: int = 48) -> bytes:
    """One photo of person ``p``: new pose, framing, expression, lighting, blur and noise."""
    big = size * 2

    def px(x: float) -> float:
        return x * big

    background = int(rng.uniform(30, 250))
    image = Image.new("L", (big, big), background)
    draw = ImageDraw.Draw(image)
    cx, cy, fw, fh = 0.5, 0.52, p["face_w"] / 2, p["face_h"] / 2
    skin, hair = int(p["skin"] + rng.normal(0, 8)), int(p["hair"] + rng.normal(0, 6))
    if p["style"] == 2:  # long hair, behind the head
        draw.rectangle([px(cx - fw - 0.05), px(cy - fh), px(cx + fw + 0.05), px(cy + fh * 0.8)], fill=hair)
    if p["ears"] > 0.02:
        for side in (-1, 1):
            x = cx + side * fw
            draw.ellipse([px(x - p["ears"]), px(cy - 0.05), px(x + p["ears"]), px(cy + 0.08)], fill=skin)
    draw.ellipse([px(cx - fw), px(cy - fh), px(cx + fw), px(cy + fh)], fill=skin)
    if p["style"] in (1, 2, 3):
        bottom = cy + fh * (0.0 if p["style"] == 3 else 0.2)
        draw.chord([px(cx - fw), px(cy - fh), px(cx + fw), px(bottom)], 180, 360, fill=hair)
    if p["beard"]:
        draw.chord([px(cx - fw), px(cy - fh * 0.2), px(cx + fw), px(cy + fh)], 0, 180, fill=max(0, hair - 10))
    eye_y, eye_r = p["eye_y"] + rng.normal(0, 0.005), p["eye_r"] * rng.uniform(0.85, 1.15)
    for side in (-1, 1):
        x = cx + side * p["eye_dx"]
        draw.ellipse([px(x - eye_r * 1.6), px(eye_y - eye_r), px(x + eye_r * 1.6), px(eye_y + eye_r)], fill=235)
        draw.ellipse(
            [px(x - eye_r * 0.8), px(eye_y - eye_r * 0.8), px(x + eye_r * 0.8), px(eye_y + eye_r * 0.8)], fill=30
        )
        brow_y, tilt = eye_y - eye_r - 0.03, side * p["brow_tilt"]
        draw.line(
            [px(x - 0.05), px(brow_y + tilt), px(x + 0.05), px(brow_y - tilt)],
            fill=max(0, hair - 20),
            width=max(1, int(p["brow_w"] * 2)),
        )
        if p["glasses"]:
            draw.ellipse([px(x - 0.07), px(eye_y - 0.06), px(x + 0.07), px(eye_y + 0.06)], outline=20, width=2)
    nose_y = eye_y + 0.04
    draw.polygon(
        [
            (px(cx), px(nose_y)),
            (px(cx - p["nose_w"]), px(nose_y + p["nose"])),
            (px(cx + p["nose_w"]), px(nose_y + p["nose"])),
        ],
        fill=max(0, skin - 35),
    )
    mouth_y, half, smile = p["mouth_y"], p["mouth_w"] / 2, rng.uniform(-0.02, 0.04)
    draw.arc(
        [px(cx - half), px(mouth_y - 0.04 - smile), px(cx + half), px(mouth_y + 0.04 + smile)],
        20,
        160,
        fill=60,
        width=4,
    )
    image = image.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=background)
    window = big / rng.uniform(0.92, 1.08)
    dx, dy = rng.uniform(-0.05, 0.05, 2) * big
    box = (big / 2 - window / 2 + dx, big / 2 - window / 2 + dy, big / 2 + window / 2 + dx, big / 2 + window / 2 + dy)
    image = image.crop(tuple(round(v) for v in box)).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2)
    pixels += np.linspace(-1, 1, size)[None, :] * rng.uniform(-30, 30) + rng.normal(0, 5, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return encoded(image)


def people(
    identities: int,
    photos: int,
    seed: int,
    first_id: int = 0,
    photo_seed: int | None = None,
    *,
    column: str = COLUMN,
    label: str = LABEL,
    size: int = 48,
) -> pd.DataFrame:
    """``photos`` photos each of ``identities`` people; the same ``seed`` draws the same people
    (the first n of a larger draw too), ``photo_seed`` draws new photos of them."""
    rng = np.random.default_rng(seed)
    persons = [draw_identity(rng) for _ in range(identities)]
    photo_rng = rng if photo_seed is None else np.random.default_rng(photo_seed)
    rows = [(draw_face(p, photo_rng, size), f"p{first_id + i}") for i, p in enumerate(persons) for _ in range(photos)]
    return pd.DataFrame(rows, columns=[column, label])


def lfw(upscale_to: int | None = None) -> tuple[list[bytes], list[bytes]]:
    """skimage's lfw_subset as PNG bytes: 100 faces, then 100 non-face patches."""
    patches = [Image.fromarray((a * 255).astype(np.uint8)) for a in skimage.data.lfw_subset()]
    if upscale_to:
        patches = [p.resize((upscale_to, upscale_to), Image.Resampling.BILINEAR) for p in patches]
    data = [encoded(p) for p in patches]
    return data[:100], data[100:]
