"""Text input handling shared by every text encoder, without torch: turning a cell into text,
cutting long inputs, pooling chunk vectors, and grouping texts into forward passes by token budget.

The pretrained sentence models import only this module, so a model run on ONNX Runtime starts
without importing torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vectorsync.encoders.base import InputError
from vectorsync.errors import MissingExtraError, ModelFileError


def cell_text(value: Any, column: str, encoding: str = "utf-8") -> str:
    """The text in one cell, or ``InputError`` saying why there is none.

    ``sync`` hands over ``str`` (already decoded), ``bytes`` (decoded here with the spec's
    ``encoding``) or ``None`` (NULL, or a referenced file that could not be read).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        raise InputError(column, f"no text in column {column!r} (NULL or unreadable file)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode(encoding)
        except UnicodeDecodeError as exc:
            raise InputError(
                column, f"column {column!r} is not valid {encoding} at byte {exc.start}; set 'encoding' in the spec"
            ) from None
        except LookupError:
            raise InputError(column, f"unknown text encoding {encoding!r}; fix 'encoding' in the spec") from None
    if not isinstance(value, str):
        raise InputError(column, f"column {column!r} holds {type(value).__name__}, expected text")
    if not value.strip():
        raise InputError(column, f"empty text in column {column!r}")
    return value


def split_long(items: Sequence[Any], max_tokens: int, long_text: str) -> list[Sequence[Any]]:
    """Cut a token sequence to ``max_tokens``: the first window (truncate) or every window (chunk)."""
    if len(items) <= max_tokens or long_text == "truncate":
        return [items[:max_tokens]]
    if long_text == "chunk":
        return [items[start : start + max_tokens] for start in range(0, len(items), max_tokens)]
    raise ValueError(f"long_text must be 'truncate' or 'chunk', got {long_text!r}")


def texts_of(batch: pd.DataFrame, column: str, encoding: str) -> tuple[dict[int, str], dict[int, InputError]]:
    """Texts by row position, and the rows that have none."""
    if column not in batch.columns:
        raise KeyError(f"input column {column!r} missing from the batch (has: {', '.join(map(str, batch.columns))})")
    texts: dict[int, str] = {}
    failures: dict[int, InputError] = {}
    for position, value in enumerate(batch[column].tolist()):
        try:
            texts[position] = cell_text(value, column, encoding)
        except InputError as error:
            failures[position] = error
    return texts, failures


def pool_pieces(piece_vectors: np.ndarray, owners: Sequence[int], n_rows: int, dim: int) -> np.ndarray:
    """Mean of each row's chunk vectors, re-normalised; rows without pieces stay NaN (failures)."""
    out = np.full((n_rows, dim), np.nan, dtype=np.float32)
    if len(owners) == 0:
        return out
    owners_arr = np.asarray(owners)
    sums = np.zeros((n_rows, dim), dtype=np.float64)
    np.add.at(sums, owners_arr, piece_vectors.astype(np.float64))
    present = np.unique(owners_arr)
    norms = np.linalg.norm(sums[present], axis=1, keepdims=True)
    out[present] = (sums[present] / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


#: A forward pass may pad its texts to this much more than their own tokens (5 %): with texts
#: sorted by length, a tighter bound splits passes so small that their fixed cost outweighs the
#: padding saved, and a looser one pads more than sentence-transformers does on the same texts.
PADDING_SLACK = 0.05


def token_batches(lengths: Sequence[int], token_budget: int, max_rows: int) -> list[list[int]]:
    """Positions of texts grouped into forward passes: sorted by length, each pass holding at most
    ``max_rows`` texts and ``token_budget`` tokens once padded to its longest text, and padding at
    most ``PADDING_SLACK`` of its tokens (a text longer than the budget runs alone)."""
    groups: list[list[int]] = []
    group: list[int] = []
    tokens = 0
    for position in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length = lengths[position]
        padded = (len(group) + 1) * length  # sorted: the newcomer is the longest
        if group and (
            len(group) >= max_rows or padded > token_budget or padded > (1 + PADDING_SLACK) * (tokens + length)
        ):
            groups.append(group)
            group, tokens = [], 0
        group.append(position)
        tokens += length
    if group:
        groups.append(group)
    return groups


class TokenizedSentenceModel:
    """A converted sentence model (the transformer, mean pooling and normalisation in one graph)
    behind the ``tokenizers`` library: the part of sentence-transformers' ``SentenceTransformer``
    that the text encoders use (``encode``, ``max_seq_length``, ``token_offsets``), without importing
    sentence-transformers or transformers. A subclass runs the graph (``run``)."""

    def __init__(self, folder: Path, dim: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MissingExtraError("converted text models", "text", "tokenizers") from None
        self.dim = dim
        self.max_seq_length = _max_seq_length(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFileError(
                f"model folder {str(folder)!r} has no tokenizer.json, which precision fp32 (on the CPU), onnx and "
                "int8 read; reinstall the model package"
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.special_tokens = self.tokenizer.num_special_tokens_to_add(is_pair=False)
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer.no_padding()

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """L2-normalised vectors of one padded pass of token ids."""
        raise NotImplementedError

    def token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's word pieces, special tokens left out."""
        self.tokenizer.no_truncation()
        try:
            return [list(e.offsets) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tokenizer.enable_truncation(max_length=self.max_seq_length)

    def passes(
        self, texts: list[str], token_budget: int, max_rows: int
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """Forward passes of similar length (``token_batches``): the texts' positions, their token
        ids padded to the pass's longest text, and the attention mask."""
        encodings = self.tokenizer.encode_batch(texts)
        for rows in token_batches([len(e.ids) for e in encodings], token_budget, max_rows):
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for row, i in enumerate(rows):
                tokens = encodings[i].ids
                ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1
            yield rows, ids, mask

    def encode(self, texts: list[str], token_budget: int, max_rows: int) -> np.ndarray:
        """L2-normalised vectors, run in passes of similar length."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for rows, ids, mask in self.passes(texts, token_budget, max_rows):
            out[rows] = self.run(ids, mask)
        return out


def _max_seq_length(folder: Path) -> int:
    """sentence-transformers' limit for the folder (``sentence_bert_config.json``), else the model's."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        try:
            return int(json.loads((folder / name).read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 512
