"""A pretrained sentence model converted to ONNX Runtime (``precision = "onnx"`` or ``"int8"``).

The conversion runs here, from the weights already installed (never a download): the transformer,
mean pooling and L2 normalisation are exported as one ONNX graph, ONNX Runtime's transformer
optimizer fuses attention, GELU and layer norms, and for ``int8`` the weights of the attention and
of most feed-forward input layers are quantized per output channel, with activations quantized
dynamically per batch. The embeddings, every feed-forward output layer and the feed-forward input
layers of the first two blocks stay in float32: with everything quantized, activation outliers pulled
single vectors down to a cosine of 0.98 against the float model; with only the output layers kept,
0.989 on 3,000 labelled texts; with these kept, 0.9935, at about the same speed.

Converted files are cached in the user cache folder (``models/``), named by the weights' SHA-256,
the precision and the library versions that made them, with a JSON record of their own SHA-256;
a file that no longer matches its record is converted again. Running a converted model needs
only ``onnxruntime`` and ``tokenizers``; converting also needs torch and transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from vectorsync.encoders.text_input import TokenizedSentenceModel
from vectorsync.errors import MissingExtraError

#: Precisions that run on ONNX Runtime.
ONNX_PRECISIONS = ("onnx", "int8")
#: Weight MatMuls int8 leaves in float32: every feed-forward output layer, and the feed-forward
#: input layers of the first two blocks, where the activation outliers hurt most.
_KEPT_FLOAT = (re.compile(r"/layer\.\d+/output/dense/"), re.compile(r"/layer\.[01]/intermediate/"))
#: Bumped whenever the conversion changes, so cached files made by an older recipe are not reused.
_RECIPE = 2


#: The libraries whose versions can change the converted file: a new version converts again.
_CONVERTERS = ("onnxruntime", "onnx", "torch", "transformers")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _CONVERTERS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "none"
    return found


def cache_folder() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vectorsync")) / "models"


def converted_model(folder: Path, weights_sha256: str, precision: str) -> tuple[Path, str]:
    """The converted model file for these weights and precision, and its SHA-256: taken from the
    cache when its record matches, else converted now (tens of seconds, once; both precisions are
    made and cached together, since int8 starts from the optimised float32 graph)."""
    from vectorsync.encoders.minilm import file_sha256

    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(ONNX_PRECISIONS)}, got {precision!r}")
    versions = _versions()
    tag = hashlib.sha256(json.dumps([_RECIPE, versions], sort_keys=True).encode()).hexdigest()[:12]

    def cached(kind: str) -> Path:
        return cache_folder() / f"{weights_sha256[:16]}-{kind}-{tag}.onnx"

    target = cached(precision)
    try:
        record = json.loads(target.with_suffix(".json").read_text())
        if target.is_file() and file_sha256(target) == record.get("sha256"):
            return target, str(record["sha256"])
    except (OSError, ValueError, AttributeError):
        pass
    cache_folder().mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=cache_folder(), prefix=".convert-") as work:
        for kind, made in _convert(folder, Path(work)).items():
            digests[kind] = _sha256(made)
            record = {"sha256": digests[kind], "weights_sha256": weights_sha256, "precision": kind, **versions}
            # Model first, then its record: a reader that finds the record finds the file it describes.
            os.replace(made, cached(kind))
            staged = Path(work) / f"{kind}.json"
            staged.write_text(json.dumps(record, indent=1))
            os.replace(staged, cached(kind).with_suffix(".json"))
    return target, digests[precision]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(folder: Path, work: Path) -> dict[str, Path]:
    """Both converted models, by precision, written under ``work``."""
    from vectorsync.encoders.traced_text import mean_pooled

    try:
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers import optimizer
        from transformers import AutoConfig
    except ImportError:
        raise MissingExtraError("converting a model for ONNX Runtime", "text", "onnx") from None

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # The eager attention exports as plain MatMul/Softmax, which the optimizer fuses into one
    # Attention op; the SDPA path exports a graph it cannot fuse (1.4x slower).
    pooled = mean_pooled(folder)
    exported = work / "exported.onnx"
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    # The tracer warns about shapes it records as constants; those paths (padding the attention mask
    # to a cache length, causal masks) never run for an encoder, and a user cannot act on them.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pooled,
            (ids, (ids != 0).long()),
            str(exported),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
            opset_version=17,
            dynamo=False,  # the dynamo exporter needs onnxscript, and traces no better here
        )
    fused = optimizer.optimize_model(
        str(exported), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    optimised = work / "fp32.onnx"
    fused.save_model_to_file(str(optimised))
    quantized = work / "int8.onnx"
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, on the root logger
    try:
        quantize_dynamic(
            str(optimised),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=_quantized_nodes(optimised),
            extra_options={"DefaultTensorType": 1},  # FLOAT, for outputs of fused ops shape inference misses
        )
    finally:
        logging.getLogger().setLevel(quiet)
    return {"onnx": optimised, "int8": quantized}


def _quantized_nodes(path: Path) -> list[str]:
    """Fused attention and the weight MatMuls, except those ``_KEPT_FLOAT`` names (see the module)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "Attention"
        or (
            node.op_type == "MatMul"
            and any(name in weights for name in node.input)
            and not any(kept.search(node.name) for kept in _KEPT_FLOAT)
        )
    ]


class OnnxSentenceModel(TokenizedSentenceModel):
    """A converted sentence model on ONNX Runtime, without importing torch."""

    def __init__(self, model_file: Path, folder: Path, threads: int) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise MissingExtraError("ONNX Runtime text models", "text", "onnxruntime") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        super().__init__(folder, int(self.session.get_outputs()[0].shape[-1]))

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
