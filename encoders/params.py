"""Each encoder's parameters as a validated model, and the nearest-name advice for a mistyped one.

A spec's ``encoder = { type = "...", ... }`` table is validated against the model its ``type``
selects (a discriminated union), when the spec loads: unknown keys and wrong types are refused
before anything trains. The encoder then receives the validated model. Some parameters are
embedding-level fields of the spec (``image_size``, ``max_tokens``...) that ``sync`` passes on: they
are listed in ``FROM_EMBEDDING`` and may not be written in the encoder table.

Only pydantic here, so loading a spec never imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vectorsync.errors import SpecError

LongText = Literal["truncate", "chunk"]
#: How the pretrained MiniLM runs: torch as shipped, or converted to ONNX Runtime (float32 or int8).
Precision = Literal["fp32", "bf16", "onnx", "int8"]
#: A torch device: "auto" picks CUDA when torch sees a GPU, else the CPU.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
_DEVICE_HELP = "Torch device: 'auto' (CUDA when torch sees a GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'."
#: What the pretrained encoders make; a spec must set this ``dim``.
MINILM_DIM = 384
DLIB_DIM = 128


class EncoderParams(BaseModel):
    """Fields every encoder takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Fields the spec sets on the embedding itself (``sync`` copies them here), not in ``[encoder]``.
    FROM_EMBEDDING: ClassVar[tuple[str, ...]] = ()
    #: The only ``dim`` a pretrained encoder makes, or None when the spec's ``dim`` is free.
    DIM: ClassVar[int | None] = None

    type: str
    seed: int = Field(0, description="Random seed for training; the same seed and rows give the same model.")


class AutoencoderParams(EncoderParams):
    """The tabular MLP autoencoder."""

    type: Literal["autoencoder"] = "autoencoder"
    epochs: int | None = Field(None, ge=1, description="Passes over the rows (default: ~3000 steps, at most 200).")
    batch_size: int = Field(256, ge=1, description="Rows per training step.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    hidden: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="Hidden layer widths (default: one of max(2 x dim, min(256, 2 x inputs)))."
    )
    noise: float = Field(0.05, ge=0, description="Denoising noise added to the inputs while training.")
    threads: int | None = Field(
        None, ge=1, description="Torch threads (default: 1, or VECTORSYNC_TORCH_THREADS); tiny layers gain nothing."
    )
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=_DEVICE_HELP)


class ImageParams(EncoderParams):
    """What the image and face encoders trained here share."""

    FROM_EMBEDDING: ClassVar[tuple[str, ...]] = ("image_size", "channels", "max_pixels")

    image_size: int = Field(32, ge=8, le=1024, description="Side of the square the model sees, in pixels.")
    channels: Literal[1, 3] = Field(1, description="1: greyscale, 3: RGB.")
    max_pixels: int = Field(24_000_000, ge=64, description="Larger images are refused before decoding.")
    min_size: int = Field(8, ge=1, description="Images smaller than this (either side, pixels) fail as unusable.")
    epochs: int = Field(20, ge=1, description="Passes over the images.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(64, ge=1, description="Images per training step.")
    shuffle_buffer: int = Field(4096, ge=1, description="Images held at once while shuffling the training stream.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=_DEVICE_HELP)
    width: int = Field(32, ge=1, description="Channels of the first conv layer, doubled per block (at most 256).")


class ConvAutoencoderParams(ImageParams):
    """The convolutional image autoencoder."""

    type: Literal["conv_autoencoder"] = "conv_autoencoder"


class IdentityCNNParams(ImageParams):
    """The face CNN trained to tell identities apart."""

    FROM_EMBEDDING: ClassVar[tuple[str, ...]] = (*ImageParams.FROM_EMBEDDING, "detect_faces", "label_column")

    type: Literal["identity_cnn"] = "identity_cnn"
    detect_faces: bool = Field(True, description="False: every image already is a face crop.")
    label_column: str | None = Field(None, description="Identity labels to train on.")
    face_margin: float = Field(0.2, ge=0, description="Share of the face's side added around it before cropping.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the embedding layer.")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay.")
    cosine_scale: float = Field(16.0, gt=0, description="Scale of the identity logits (NormFace).")
    cosine_margin: float = Field(0.2, ge=0, description="Margin subtracted from the true identity's cosine (CosFace).")
    augment: bool = Field(True, description="Random flips, small rotations/shifts/zooms, brightness and contrast.")


class DlibParams(EncoderParams):
    """The pretrained dlib face ResNet (128-d); it aligns its own 150 px RGB face chips."""

    FROM_EMBEDDING: ClassVar[tuple[str, ...]] = ("image_size", "channels", "max_pixels", "detect_faces", "label_column")

    DIM: ClassVar[int | None] = DLIB_DIM

    type: Literal["dlib"] = "dlib"
    image_size: int = Field(150, ge=8, le=1024, description="Unused: dlib sizes its own face chips.")
    channels: Literal[1, 3] = Field(3, description="Unused: dlib reads RGB.")
    max_pixels: int = Field(24_000_000, ge=64, description="Larger images are refused before decoding.")
    detect_faces: bool = Field(True, description="False: every image already is a face crop.")
    label_column: str | None = Field(None, description="Unused: nothing is trained.")
    min_size: int = Field(8, ge=1, description="Images smaller than this (either side, pixels) fail as unusable.")
    num_jitters: int = Field(0, ge=0, description="> 0 averages jittered chips: slower, slightly more robust.")
    max_side: int = Field(1024, ge=1, description="Larger images are downscaled before face detection.")


class TextParams(EncoderParams):
    """What every text encoder takes from the embedding."""

    FROM_EMBEDDING: ClassVar[tuple[str, ...]] = ("max_tokens", "long_text", "encoding")

    max_tokens: int = Field(256, ge=1, description="Tokens the model reads per text (or per chunk).")
    long_text: LongText = Field("truncate", description="Longer texts: 'truncate', or 'chunk' and average.")
    encoding: str = Field("utf-8", description="Encoding of referenced text files.")


class LSTMParams(TextParams):
    """The LSTM text encoder trained on the column's own corpus."""

    type: Literal["lstm"] = "lstm"
    vocab_size: int = Field(20_000, ge=1, description="Most frequent tokens kept, plus <pad> and <unk>.")
    min_count: int = Field(2, ge=1, description="Rarer tokens map to <unk>.")
    embedding_dim: int = Field(128, ge=1, description="Word vector size.")
    hidden_size: int = Field(64, ge=1, description="LSTM hidden size.")
    num_layers: int = Field(1, ge=1, description="Stacked LSTM layers.")
    bidirectional: bool = Field(True, description="Read the text in both directions.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout between layers.")
    epochs: int = Field(8, ge=1, description="Passes over the corpus.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(128, ge=1, description="Texts per training step.")
    word_dropout: float = Field(0.5, ge=0, lt=1, description="Share of tokens each contrastive view deletes.")
    temperature: float = Field(0.05, gt=0, description="Contrastive loss temperature.")
    cooccurrence_init: bool = Field(True, description="Start word vectors from the corpus' PPMI + SVD.")
    cooccurrence_words: int = Field(4096, ge=1, description="Most frequent words that get co-occurrence vectors.")
    shuffle_buffer: int = Field(8192, ge=1, description="Training sequences shuffled together while streaming.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=_DEVICE_HELP)


class SentenceModelParams(TextParams):
    """What the pretrained sentence models share."""

    batch_size: int = Field(128, ge=1, description="Most texts per forward pass.")
    token_budget: int = Field(
        4096, ge=1, description="Most tokens per forward pass, counting padding; texts of similar length share one."
    )
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=_DEVICE_HELP)


class MiniLMParams(SentenceModelParams):
    """The bundled pretrained all-MiniLM-L6-v2 sentence model (384-d)."""

    DIM: ClassVar[int | None] = MINILM_DIM

    type: Literal["minilm"] = "minilm"
    precision: Precision = Field(
        "fp32",
        description=(
            "'fp32': torch, as shipped; 'bf16': torch, bfloat16 weights; 'onnx': ONNX Runtime, float32; "
            "'int8': ONNX Runtime, int8 weights."
        ),
    )

    @model_validator(mode="after")
    def _onnx_runs_on_the_cpu(self) -> MiniLMParams:
        if self.precision in ("onnx", "int8") and self.device.startswith("cuda"):
            raise ValueError(
                f"precision = {self.precision!r} runs on the CPU (ONNX Runtime); "
                "set device = 'auto' or 'cpu', or precision = 'fp32' to use CUDA"
            )
        return self


class SentenceTransformerParams(SentenceModelParams):
    """Any sentence-transformers model folder on disk."""

    type: Literal["sentence_transformer"] = "sentence_transformer"
    path: str = Field(description="The sentence-transformers model folder.")
    sha256: str | None = Field(None, description="Expected SHA-256 of the weights file.")


class GraphSAGEParams(EncoderParams):
    """Native GraphSAGE over a graph's node feature columns and edges (inductive)."""

    type: Literal["graphsage"] = "graphsage"
    aggregator: Literal["mean", "pool"] = Field("mean", description="How a node combines its neighbours.")
    layers: int = Field(2, ge=1, le=4, description="Layers, i.e. hops of neighbourhood a vector depends on.")
    fan_outs: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="Neighbours sampled per hop while training, nearest hop first (default 25, 10, 10...)."
    )
    hidden: int = Field(128, ge=1, description="Width of the layers before the last.")
    epochs: int = Field(
        5, ge=1, description="Passes over the training nodes (more overfit the unsupervised loss on Cora)."
    )
    lr: float = Field(0.01, gt=0, description="Adam learning rate.")
    batch_size: int = Field(256, ge=1, description="Target nodes per training step.")
    negatives: int = Field(20, ge=1, description="Negative nodes per step (unsupervised loss).")
    walk_length: int = Field(2, ge=1, description="Random-walk steps within which two nodes count as a positive pair.")
    loss: Literal["contrastive", "logistic"] = Field(
        "contrastive",
        description="Unsupervised loss: softmax of each walk partner against the batch's other partners and the "
        "negatives, or the paper's per-pair sigmoid.",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the contrastive loss.")
    label_column: str | None = Field(
        None, description="Train supervised on this node-table column's labels instead of the unsupervised loss."
    )
    threads: int | None = Field(None, ge=1, description="Torch threads (default 1: the layers are small).")

    @model_validator(mode="after")
    def _one_fan_out_per_layer(self) -> GraphSAGEParams:
        if self.fan_outs is not None and len(self.fan_outs) != self.layers:
            raise ValueError(
                f"fan_outs has {len(self.fan_outs)} values but layers is {self.layers}; give one per layer"
            )
        return self

    @property
    def hop_fan_outs(self) -> list[int]:
        return list(self.fan_outs) if self.fan_outs is not None else [25, *([10] * (self.layers - 1))]


#: Every encoder's parameter model, by the ``type`` a spec names.
PARAMS: dict[str, type[EncoderParams]] = {
    model.model_fields["type"].default: model
    for model in (
        AutoencoderParams,
        ConvAutoencoderParams,
        IdentityCNNParams,
        DlibParams,
        LSTMParams,
        MiniLMParams,
        SentenceTransformerParams,
        GraphSAGEParams,
    )
}


def nearest(name: str, valid: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the valid name closest to ``name``, or nothing."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def explain(error: Mapping[str, Any], model: type[BaseModel], what: str, where: str) -> str:
    """One pydantic error of ``model`` in our words: ``what`` names the kind of setting ("encoder
    parameter"), ``where`` the place ("in embedding 'items'")."""
    name = ".".join(str(p) for p in error["loc"]) or "(entry)"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = sorted(set(model.model_fields) - {"type", *getattr(model, "FROM_EMBEDDING", ())})
        return f"unknown {what} {name!r} {where}{nearest(str(error['loc'][-1]), valid)} (valid: {', '.join(valid)})"
    if kind == "missing":
        return f"{what} {name!r} {where} is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{what} {name} = {error.get('input')!r} {where} is not valid: {message}"


def validate_params(type_name: str, values: Mapping[str, Any] | EncoderParams | None) -> EncoderParams:
    """``values`` checked against ``type_name``'s model; ``SpecError`` naming the parameter."""
    model = PARAMS[type_name]
    if isinstance(values, model):
        return values
    raw = dict(values.model_dump(exclude_unset=True) if isinstance(values, BaseModel) else values or {})
    raw.setdefault("type", type_name)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [explain(e, model, "encoder parameter", f"of the {type_name} encoder") for e in exc.errors()]
        raise SpecError("; ".join(problems)) from None
