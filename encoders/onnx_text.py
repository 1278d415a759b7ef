"""A pretrained sentence model converted to ONNX Runtime (``precision = "onnx"`` or ``"int8"``).

The conversion runs here, from the weights already installed (never a download): the transformer,
mean pooling and L2 normalisation are exported as one ONNX graph, and ONNX Runtime's transformer
optimizer fuses attention, GELU and layer norms. For ``int8`` every weight MatMul and the attention
are then quantized (weights per output channel, activations dynamically per batch), after two
rewrites that keep the vectors within a cosine of 0.99 of the float model:

- Outlier channel splitting. A few channels of each feed-forward layer's input carry activations
  5-7x larger than all others (up to 30 against 4-6), and with one quantization range per batch
  they squash every other channel: quantized as they are, single vectors fell to a cosine of 0.975.
  Each such channel is divided by ``n`` and fed ``n`` times, its weight row repeated, which computes
  the same product with a range ``n`` times smaller. The channels are found by running the float
  model on calibration texts made from the tokenizer's own vocabulary (``_calibration_texts``):
  which channels are outliers is a property of the model, not of the texts (calibrating on our
  labelled test corpus, on Python docstrings or on random vocabulary gave the same fidelity), and
  splitting never enlarges a channel, so texts unlike the calibration ones lose nothing by it.
  Scaling those channels down and the weights up instead (SmoothQuant) costs weight precision, and
  fitted to one kind of text it pulled others down to a cosine of 0.95.
- The tanh approximation of GELU (``FastGelu``): exact-erf GELU took 13 % of int8's time, and the
  approximation moves no vector by more than quantization already does.

Converted files are cached in the user cache folder (``models/``), named by the weights' SHA-256,
the precision, the recipe and the library versions that made them, with a JSON record of their own
SHA-256; a file that no longer matches its record is converted again. Running a converted model
needs only ``onnxruntime`` and ``tokenizers``; converting also needs torch and transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vectorsync.encoders.text_input import TokenizedSentenceModel
from vectorsync.errors import MissingExtraError

#: Precisions that run on ONNX Runtime.
ONNX_PRECISIONS = ("onnx", "int8")
#: The feed-forward MatMuls, whose inputs (a layer norm's output and a GELU's) hold the outlier
#: channels that ``_split_outliers`` spreads out.
_FEED_FORWARD = (re.compile(r"/layer\.\d+/intermediate/dense/MatMul$"), re.compile(r"/layer\.\d+/output/dense/MatMul$"))
#: Extra input channels each feed-forward MatMul gets: enough to bring its largest channels down
#: to the others' size; more gained no fidelity, and each costs 1/1,536 of the layer's work.
_SPLIT_CHANNELS = 16
#: Calibration texts (``_calibration_texts``) and their seed.
_CALIBRATION_TEXTS = 256
_RECIPE = 3


#: The libraries whose versions can change the converted file: a new version converts again.
_CONVERTERS = ("onnxruntime", "onnx", "torch", "transformers")


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each library ("none" when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "none"
    return found


def cache_folder() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vectorsync")) / "models"


def cache_tag(recipe: int, versions: dict[str, str]) -> str:
    """A short name part for files made by ``recipe`` with these library versions."""
    return hashlib.sha256(json.dumps([recipe, versions], sort_keys=True).encode()).hexdigest()[:12]


def cached_sha256(target: Path) -> str | None:
    """The SHA-256 that ``target``'s record (``.json`` beside it) gives, when the file is there and
    still matches it; None when it must be made (again)."""
    from vectorsync.encoders.minilm import file_sha256

    try:
        record = json.loads(target.with_suffix(".json").read_text())
        if target.is_file() and file_sha256(target) == record.get("sha256"):
            return str(record["sha256"])
    except (OSError, ValueError, AttributeError):
        pass
    return None


def store_cached(made: Path, target: Path, record: dict[str, Any]) -> str:
    """Move a just-made file to ``target`` and write its record (its SHA-256 and ``record``);
    returns the SHA-256. The model goes first, then its record: a reader that finds the record
    finds the file it describes."""
    digest = _sha256(made)
    os.replace(made, target)
    staged = made.with_name(f".{target.name}.json")
    staged.write_text(json.dumps({"sha256": digest, **record}, indent=1))
    os.replace(staged, target.with_suffix(".json"))
    return digest


def converted_model(folder: Path, weights_sha256: str, precision: str) -> tuple[Path, str]:
    """The converted model file for these weights and precision, and its SHA-256: taken from the
    cache when its record matches, else converted now (tens of seconds, once; both precisions are
    made and cached together, since int8 starts from the optimised float32 graph)."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(ONNX_PRECISIONS)}, got {precision!r}")
    versions = library_versions(_CONVERTERS)
    tag = cache_tag(_RECIPE, versions)

    def cached(kind: str) -> Path:
        return cache_folder() / f"{weights_sha256[:16]}-{kind}-{tag}.onnx"

    target = cached(precision)
    digest = cached_sha256(target)
    if digest is not None:
        return target, digest
    cache_folder().mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=cache_folder(), prefix=".convert-") as work:
        for kind, made in _convert(folder, Path(work)).items():
            digests[kind] = store_cached(
                made, cached(kind), {"weights_sha256": weights_sha256, "precision": kind, **versions}
            )
    return target, digests[precision]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(folder: Path, work: Path) -> dict[str, Path]:
    """Both converted models, by precision, written under ``work``."""
    from vectorsync.encoders.traced_text import example_input, mean_pooled, quiet_tracing

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
    with quiet_tracing():
        torch.onnx.export(
            pooled,
            example_input(),
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
    rewritten = work / "int8-input.onnx"
    _rewrite_for_int8(optimised, rewritten, _channel_peaks(optimised, folder, work))
    quantized = work / "int8.onnx"
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, on the root logger
    try:
        quantize_dynamic(
            str(rewritten),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=_quantized_nodes(rewritten),
            extra_options={"DefaultTensorType": 1},  # FLOAT, for outputs of fused ops shape inference misses
        )
    finally:
        logging.getLogger().setLevel(quiet)
    return {"onnx": optimised, "int8": quantized}


def _feed_forward(graph: Any) -> list[Any]:
    """The feed-forward weight MatMuls of the graph (``_FEED_FORWARD``)."""
    weights = {init.name for init in graph.initializer}
    return [
        node
        for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in weights and any(p.search(node.name) for p in _FEED_FORWARD)
    ]


def _calibration_texts(folder: Path) -> list[str]:
    """Deterministic texts of 4-40 whole words drawn from the tokenizer's vocabulary: enough to
    show which channels a model's activations peak in, without shipping or downloading a corpus."""
    from tokenizers import Tokenizer

    vocabulary = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    words = sorted(word for word in vocabulary if word.isascii() and word.isalpha() and len(word) > 1)
    rng = random.Random(0)
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 40))).capitalize() + "."
        for _ in range(_CALIBRATION_TEXTS)
    ]


def _channel_peaks(model_file: Path, folder: Path, work: Path) -> dict[str, np.ndarray]:
    """Largest absolute value of each input channel of each feed-forward MatMul, by node name, over
    the calibration texts' real tokens (padding left out)."""
    import onnx

    model = onnx.load(str(model_file))
    matmuls = _feed_forward(model.graph)
    inputs = [node.input[0] for node in matmuls]
    for name in inputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = work / "calibration.onnx"
    onnx.save(model, str(probe))
    runner = OnnxSentenceModel(probe, folder, threads=1)
    peaks = {name: np.zeros(0, dtype=np.float32) for name in inputs}
    for _, ids, mask in runner.passes(_calibration_texts(folder), token_budget=4096, max_rows=128):
        real = mask.reshape(-1).astype(bool)
        for name, values in zip(inputs, runner.session.run(inputs, {"input_ids": ids, "attention_mask": mask}),
                                strict=True):
            peak = np.abs(values.reshape(-1, values.shape[-1])[real]).max(axis=0)
            peaks[name] = peak if not peaks[name].size else np.maximum(peaks[name], peak)
    probe.unlink()
    return {node.name: peaks[node.input[0]] for node in matmuls}


def _rewrite_for_int8(source: Path, target: Path, peaks: dict[str, np.ndarray]) -> None:
    """Split the outlier channels of the feed-forward MatMuls and approximate GELU (see the module)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for node in _feed_forward(graph):
        peak = peaks[node.name].astype(np.float64)
        parts = np.ones(len(peak), dtype=np.int64)
        for _ in range(_SPLIT_CHANNELS):  # each extra copy goes to the channel whose share is largest now
            parts[int(np.argmax(peak / parts))] += 1
        copies = np.repeat(np.arange(len(peak)), parts - 1)
        weight = numpy_helper.to_array(weights[node.input[1]])
        split_weight = numpy_helper.from_array(np.concatenate([weight, weight[copies]]), node.input[1])
        weights[node.input[1]].CopyFrom(split_weight)
        # Names without the "_scale" / "_quantized" suffixes the quantizer gives the tensors it adds.
        base = node.name
        graph.initializer.extend([
            numpy_helper.from_array((1.0 / parts).astype(np.float32), f"{base}/split_factor"),
            numpy_helper.from_array(copies, f"{base}/split_copies"),
        ])
        rewrite = [
            helper.make_node("Mul", [node.input[0], f"{base}/split_factor"], [f"{base}/split_shrunk"],
                             name=f"{base}/split_shrink"),
            helper.make_node("Gather", [f"{base}/split_shrunk", f"{base}/split_copies"], [f"{base}/split_extra"],
                             name=f"{base}/split_gather", axis=-1),
            helper.make_node("Concat", [f"{base}/split_shrunk", f"{base}/split_extra"], [f"{base}/split_input"],
                             name=f"{base}/split_concat", axis=-1),
        ]
        node.input[0] = f"{base}/split_input"
        at = list(graph.node).index(node)
        for offset, added in enumerate(rewrite):
            graph.node.insert(at + offset, added)
    for node in graph.node:
        if node.op_type == "BiasGelu":  # same inputs (x, bias) and domain
            node.op_type = "FastGelu"
    onnx.save(model, str(target))


def _quantized_nodes(path: Path) -> list[str]:
    """Fused attention and every weight MatMul."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "Attention" or (node.op_type == "MatMul" and any(name in weights for name in node.input))
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
