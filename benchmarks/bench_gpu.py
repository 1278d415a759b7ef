"""Training and encoding on CUDA against the CPU of the same machine, in the same run.

Images: the convolutional autoencoder on sklearn's handwritten digits (PNG bytes, as a ``bytea``
column holds them, upsampled to 32 px), trained and encoded; encoding includes decoding the PNGs,
as a sync does. Text: the corpus-trained LSTM (train and encode) and the pretrained MiniLM (encode).
Each figure is a CUDA rate with the CPU rate (all cores the process may use) as its baseline.
Each device first runs a small untimed pass, so one-time costs (CUDA's context, cuDNN) are not
counted in the rates. Without a GPU it says so and measures nothing. Sized to finish within 5 minutes on a GPU machine:

    python -m benchmarks.bench_gpu           # or: python -m benchmarks.run gpu [--quick]
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import Figure

NAME = "gpu"
IMAGE_SIZE = 32


def _digits(count: int) -> pd.DataFrame:
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    pictures = []
    for pixels in data.images[: min(count, len(data.images))]:
        image = Image.fromarray((pixels / 16 * 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        pictures.append(buffer.getvalue())
    repeated = (pictures * (count // len(pictures) + 1))[:count]
    return pd.DataFrame({"picture": repeated})


def _texts(count: int) -> pd.DataFrame:
    from tests.text_data import make_corpus

    texts, _ = make_corpus(count, seed=13)
    return pd.DataFrame({"body": texts})


def _chunks(frame: pd.DataFrame, size: int = 1024) -> Callable[[], Iterator[pd.DataFrame]]:
    return lambda: (frame.iloc[start : start + size] for start in range(0, len(frame), size))


def _rate(count: int, work: Callable[[], object], device: str) -> float:
    import torch

    started = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def _measure(device: str, images: pd.DataFrame, texts: pd.DataFrame, epochs: int) -> dict[str, float]:
    from vectorsync.encoders.image import ConvAutoencoder
    from vectorsync.encoders.text import LSTMTextEncoder

    rates: dict[str, float] = {}
    image_params = {"image_size": IMAGE_SIZE, "channels": 1, "epochs": epochs, "batch_size": 256, "device": device}
    image_encoder = ConvAutoencoder(32, ["picture"], image_params)
    rates["conv autoencoder: train images/s"] = _rate(
        len(images) * epochs, lambda: image_encoder.fit(_chunks(images)), device
    )
    rates["conv autoencoder: encode images/s"] = _rate(len(images), lambda: image_encoder.encode(images), device)
    lstm = LSTMTextEncoder(64, ["body"], {"epochs": epochs, "device": device})
    rates["lstm: train texts/s"] = _rate(len(texts) * epochs, lambda: lstm.fit(_chunks(texts)), device)
    rates["lstm: encode texts/s"] = _rate(len(texts), lambda: lstm.encode(texts), device)
    try:
        from vectorsync.encoders.minilm import MiniLMEncoder

        minilm = MiniLMEncoder(384, ["body"], {"device": device, "batch_size": 128})
        minilm.encode(texts.iloc[:64])  # loads the model outside the timing
        rates["minilm: encode texts/s"] = _rate(len(texts), lambda: minilm.encode(texts), device)
    except ImportError as exc:  # the bundled model is an optional extra
        print(f"[{NAME}] minilm skipped: {exc}", file=sys.stderr)
    return rates


def run(data_dir: Path, quick: bool) -> list[Figure]:
    """``data_dir`` is unused: nothing here touches the database."""
    import torch

    from vectorsync.sync.models import configure_torch

    if not torch.cuda.is_available():
        print(f"[{NAME}] skipped: torch sees no CUDA GPU on this machine", file=sys.stderr)
        return []
    configure_torch()
    count, epochs = (1_000, 1) if quick else (8_000, 2)
    images, texts = _digits(count), _texts(count)
    measured = {}
    for device in ("cuda", "cpu"):
        # One small untimed pass first: CUDA's context, cuDNN and the kernels' first launches are paid
        # once per process (a worker pays them at start-up), not per batch.
        _measure(device, images.iloc[:256], texts.iloc[:256], 1)
        measured[device] = _measure(device, images, texts, epochs)
    gpu = torch.cuda.get_device_name(0)
    print(f"[{NAME}] {gpu}, {torch.get_num_threads()} CPU threads, {count} images and texts", file=sys.stderr)
    figures = [
        Figure(NAME, f"{name} on CUDA ({gpu})", rate, unit, "CPU, same machine", measured["cpu"][name])
        for name, rate in measured["cuda"].items()
        if name in measured["cpu"]
        for unit in [name.rsplit(" ", 1)[1]]
    ]
    raw = _sentence_transformers_cuda(texts)
    if raw is not None and "minilm: encode texts/s" in measured["cuda"]:
        figures.append(
            Figure(
                NAME,
                f"minilm: encode texts/s on CUDA ({gpu}) against the raw model",
                measured["cuda"]["minilm: encode texts/s"],
                "texts/s",
                "sentence-transformers encode, same GPU",
                raw,
            )
        )
    return figures


def _sentence_transformers_cuda(texts: pd.DataFrame) -> float | None:
    """sentence-transformers' own ``encode`` of the same texts on the GPU, at its defaults."""
    try:
        from sentence_transformers import SentenceTransformer

        from vectorsync.encoders.minilm import MiniLMEncoder
    except ImportError:
        return None
    model = SentenceTransformer(str(MiniLMEncoder(384, ["body"], {}).folder()), device="cuda")
    bodies = texts["body"].tolist()
    model.encode(bodies[:256])
    return _rate(len(bodies), lambda: model.encode(bodies), "cuda")


if __name__ == "__main__":
    for figure in run(Path("."), "--quick" in sys.argv):
        print(figure.line())
