"""MiniLM at ``precision = "bf16"``, ``"onnx"`` and ``"int8"`` against sentence-transformers' own ``encode``,
with the fidelity of the vectors, all in one run.

The same labelled texts (tests/text_data.py) are encoded window by window: in each window of 500
texts every contender encodes the whole window, in an order that alternates between windows, so a
burst of other load on a shared machine falls on all of them alike. Each rate is texts over the
contender's summed time. Fidelity is measured on the same vectors: the minimum cosine of each
precision's vectors to sentence-transformers' (target ≥ 0.99) and the change of kNN label agreement
(5 neighbours, target within 0.01). No database: this is the encoder a worker runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import Figure

WINDOW = 500


def _contenders() -> dict[str, Callable[[list[str]], np.ndarray]]:
    import torch
    from sentence_transformers import SentenceTransformer

    from vectorsync.encoders.base import thread_count
    from vectorsync.encoders.minilm import MiniLMEncoder, minilm_folder

    torch.set_num_threads(thread_count())  # every contender gets the machine's cores
    model = SentenceTransformer(str(minilm_folder()), device="cpu", local_files_only=True)
    contenders: dict[str, Callable[[list[str]], np.ndarray]] = {
        "sentence-transformers": lambda texts: model.encode(texts, normalize_embeddings=True)
    }
    for precision in ("fp32", "bf16", "onnx", "int8"):
        encoder = MiniLMEncoder(384, ["body"], {"precision": precision, "device": "cpu"})
        encoder.get_state()  # converts (or reads the cache) before anything is timed

        def encode(texts: list[str], encoder: MiniLMEncoder = encoder) -> np.ndarray:
            return encoder.encode(pd.DataFrame({"body": texts})).vectors

        contenders[f"vectorsync {precision}"] = encode
    return contenders


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from tests.text_data import knn_label_agreement, make_corpus

    texts, labels = make_corpus(600 if quick else 3000, seed=29)
    contenders = _contenders()
    for encode in contenders.values():
        encode(texts[:64])  # warm-up: first-call allocations
    seconds = dict.fromkeys(contenders, 0.0)
    vectors = {name: np.zeros((len(texts), 384), dtype=np.float32) for name in contenders}
    for window, start in enumerate(range(0, len(texts), WINDOW)):
        chunk = texts[start : start + WINDOW]
        names = list(contenders) if window % 2 == 0 else list(reversed(contenders))
        for name in names:
            began = time.perf_counter()
            vectors[name][start : start + len(chunk)] = contenders[name](chunk)
            seconds[name] += time.perf_counter() - began
    reference = vectors["sentence-transformers"]
    baseline = len(texts) / seconds["sentence-transformers"]
    reference_agreement = knn_label_agreement(reference, labels)
    figures = []
    for name in contenders:
        if name == "sentence-transformers":
            continue
        precision = name.split()[-1]
        cosine = float((vectors[name] * reference).sum(1).min())
        delta = knn_label_agreement(vectors[name], labels) - reference_agreement
        target = "ratio ≥ 2.0" if precision in ("int8", "bf16") else None
        figures += [
            Figure("text precision", f"texts/s, {len(texts):,} texts, MiniLM {precision}", len(texts) / seconds[name],
                   "texts/s", "sentence-transformers encode", baseline, target),
            Figure("text precision", f"min cosine to full precision, MiniLM {precision}", cosine, "", None, None,
                   "≥ 0.99"),
            Figure("text precision", f"kNN label agreement change (k=5), MiniLM {precision}", delta, "", None, None,
                   "within ±0.01"),
        ]
    return figures
