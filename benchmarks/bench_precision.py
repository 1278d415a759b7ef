"""MiniLM at ``precision = "bf16"``, ``"onnx"`` and ``"int8"`` against sentence-transformers' own ``encode``,
with the fidelity of the vectors, all in one run.

The same labelled texts (tests/text_data.py) are encoded window by window: in each window every
contender encodes the whole window, in an order that alternates between windows, so a burst of
other load on a shared machine falls on all of them alike. Each rate is texts over the contender's
summed time. Two passes: every contender on all usable cores, timed by the wall clock (what a user
sees), then every contender on one thread, timed by the process's CPU time (what a quiet machine
would give: on a shared one, the wall clock mostly measures who loses more to the others, and
torch's threads lose more than ONNX Runtime's). Fidelity is measured on the first pass's vectors:
the minimum cosine of each precision's vectors to sentence-transformers' (target ≥ 0.99) and the
change of kNN label agreement (5 neighbours, target within 0.01). No database: this is the encoder
a worker runs. The load average is reported with the figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import Figure

#: Texts per window: all cores (wall clock), one thread (CPU time).
WINDOW = 500
CPU_WINDOW = 250

Contenders = dict[str, Callable[[list[str]], np.ndarray]]


def _contenders(threads: int) -> Contenders:
    import torch
    from sentence_transformers import SentenceTransformer

    from vectorsync.encoders.base import THREADS_ENV
    from vectorsync.encoders.minilm import MiniLMEncoder, minilm_folder

    torch.set_num_threads(threads)
    os.environ[THREADS_ENV] = str(threads)  # what the ONNX Runtime sessions made below run on
    model = SentenceTransformer(str(minilm_folder()), device="cpu", local_files_only=True)
    contenders: Contenders = {"sentence-transformers": lambda texts: model.encode(texts, normalize_embeddings=True)}
    for precision in ("fp32", "bf16", "onnx", "int8"):
        encoder = MiniLMEncoder(384, ["body"], {"precision": precision, "device": "cpu"})
        encoder.get_state()  # converts (or reads the cache) before anything is timed

        def encode(texts: list[str], encoder: MiniLMEncoder = encoder) -> np.ndarray:
            return encoder.encode(pd.DataFrame({"body": texts})).vectors

        contenders[f"vectorsync {precision}"] = encode
    return contenders


def _interleaved(
    contenders: Contenders, texts: list[str], window: int, clock: Callable[[], float]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Each contender's summed ``clock`` time over the windows, and its vectors."""
    for encode in contenders.values():
        encode(texts[:64])  # warm-up: first-call allocations
    seconds = dict.fromkeys(contenders, 0.0)
    vectors = {name: np.zeros((len(texts), 384), dtype=np.float32) for name in contenders}
    for number, start in enumerate(range(0, len(texts), window)):
        chunk = texts[start : start + window]
        for name in list(contenders) if number % 2 == 0 else list(reversed(contenders)):
            began = clock()
            vectors[name][start : start + len(chunk)] = contenders[name](chunk)
            seconds[name] += clock() - began
    return seconds, vectors


def run(data_dir: Path, quick: bool) -> list[Figure]:
    from tests.text_data import knn_label_agreement, make_corpus
    from vectorsync.encoders.base import THREADS_ENV, thread_count

    texts, labels = make_corpus(600 if quick else 3000, seed=29)
    cores = thread_count()
    saved = os.environ.get(THREADS_ENV)
    loads = [os.getloadavg()[0]]
    try:
        wall, vectors = _interleaved(_contenders(cores), texts, WINDOW, time.perf_counter)
        loads.append(os.getloadavg()[0])
        one_thread = texts[: len(texts) // 2]
        cpu, _ = _interleaved(_contenders(1), one_thread, CPU_WINDOW, time.process_time)
        loads.append(os.getloadavg()[0])
    finally:
        if saved is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = saved
    reference = vectors["sentence-transformers"]
    reference_agreement = knn_label_agreement(reference, labels)
    figures = [
        Figure("text precision", "load average (1 min): start / after the wall pass / end, highest shown",
               max(loads), " / ".join(f"{load:.1f}" for load in loads)),
    ]
    for name in [name for name in wall if name != "sentence-transformers"]:
        precision = name.split()[-1]
        target = "ratio ≥ 2.0" if precision in ("int8", "bf16") else None
        cosine = float((vectors[name] * reference).sum(1).min())
        delta = knn_label_agreement(vectors[name], labels) - reference_agreement
        figures += [
            Figure("text precision", f"texts/s, wall, {cores} threads, {len(texts):,} texts, MiniLM {precision}",
                   len(texts) / wall[name], "texts/s", "sentence-transformers encode",
                   len(texts) / wall["sentence-transformers"], target),
            Figure("text precision", f"texts/s, CPU time, 1 thread, {len(one_thread):,} texts, MiniLM {precision}",
                   len(one_thread) / cpu[name], "texts/s", "sentence-transformers encode, 1 thread",
                   len(one_thread) / cpu["sentence-transformers"], target),
            Figure("text precision", f"min cosine to full precision, MiniLM {precision}", cosine, "", None, None,
                   "≥ 0.99"),
            Figure("text precision", f"kNN label agreement change (k=5), MiniLM {precision}", delta, "", None, None,
                   "within ±0.01"),
        ]
    return figures

