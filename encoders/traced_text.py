"""A pretrained sentence model traced to TorchScript, so that float32 on the CPU starts without
importing transformers or sentence-transformers.

Importing sentence-transformers (transformers, scipy, scikit-learn with it) took 5 to 10 s of every
start-up of ``sync`` and ``worker``, twice to four times ``import torch``. The trace is made here, once,
from the weights already installed (never a download): transformers' own BERT with eager attention,
then sentence-transformers' mean pooling and L2 normalisation, recorded with ``torch.jit.trace`` on a
padded example (every shape stays dynamic) and cached in the user cache folder (``models/``), named by
the weights' SHA-256 and the torch and transformers versions that made it, next to a JSON record of
its own SHA-256; a file that no longer matches its record is traced again. Running it needs only
torch and ``tokenizers``. Its vectors equal sentence-transformers' (tests/test_startup.py).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vectorsync.encoders.onnx_text import cache_folder, cache_tag, cached_sha256, library_versions, store_cached
from vectorsync.encoders.text_input import TokenizedSentenceModel
from vectorsync.errors import MissingExtraError

#: Bumped whenever the trace changes, so cached files made by an older recipe are not reused.
_RECIPE = 1


def mean_pooled(folder: Path) -> Any:
    """The folder's transformer (eager attention), then mean pooling and L2 normalisation, as one
    torch module taking ``input_ids`` and ``attention_mask``."""
    try:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise MissingExtraError("converting a pretrained text model", "text", "transformers") from None

    class MeanPooled(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            states = self.network(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    bars = transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    # its "Loading weights" bar would cut into ours, and its notes on training settings mean nothing here
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        # Eager attention, as the ONNX export uses: traced, it ran as fast as the SDPA path.
        network = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    return MeanPooled(network).eval()


def example_input() -> tuple[Any, Any]:
    """Token ids and attention mask of two short padded texts, to trace or export a model with
    (every shape stays dynamic)."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    return ids, (ids != 0).long()


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """No gradients, and none of the tracer's warnings about shapes it records as constants: those
    paths (padding the attention mask to a cache length, causal masks) never run for an encoder,
    and a user cannot act on them."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def traced_model(folder: Path, weights_sha256: str) -> Path:
    """The traced model file for these weights: from the cache when its record matches, else
    traced now (seconds, once per weights and library versions)."""
    versions = library_versions(("torch", "transformers"))
    target = cache_folder() / f"{weights_sha256[:16]}-torchscript-{cache_tag(_RECIPE, versions)}.pt"
    if cached_sha256(target) is not None:
        return target
    cache_folder().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_folder(), prefix=".trace-") as work:
        made = Path(work) / "model.pt"
        _trace(folder, made)
        store_cached(made, target, {"weights_sha256": weights_sha256, **versions})
    return target


def _trace(folder: Path, out: Path) -> None:
    import torch

    with quiet_tracing():
        traced = torch.jit.trace(mean_pooled(folder), example_input(), check_trace=False)
    traced.save(str(out))


class TracedSentenceModel(TokenizedSentenceModel):
    """A traced sentence model run by torch on the CPU (torch's threads are set by the caller)."""

    def __init__(self, model_file: Path, folder: Path) -> None:
        import torch

        self.network = torch.jit.load(str(model_file), map_location="cpu").eval()
        hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
        super().__init__(folder, int(hidden))

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return np.asarray(self.network(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
