"""The validated model of ``vectorsync.toml``: the single source of truth for migrations, workers
and queries.

Each ``[[embeddings]]`` entry declares one embedding. Errors name the embedding and the field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vectorsync.embedding_sql import index as vector_index
from vectorsync.embedding_sql import storage as vector_storage
from vectorsync.embedding_sql.distance import Distance
from vectorsync.encoders.params import (
    PARAMS,
    AutoencoderParams,
    ConvAutoencoderParams,
    DlibParams,
    EncoderParams,
    GraphSAGEParams,
    IdentityCNNParams,
    LSTMParams,
    MiniLMParams,
    SentenceTransformerParams,
    explain,
    nearest,
)
from vectorsync.encoders.registry import DEFAULT_ENCODER
from vectorsync.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IndexSpec(_Strict):
    """Vector index on the target table. ``m``/``ef_construction``/``ef_search`` for HNSW,
    ``lists``/``probes`` for IVFFlat."""

    kind: vector_index.IndexKind = vector_index.INDEX_KIND
    m: int = Field(vector_index.HNSW_M, ge=2, le=100)
    ef_construction: int = Field(vector_index.HNSW_EF_CONSTRUCTION, ge=4, le=1000)
    ef_search: int = Field(vector_index.HNSW_EF_SEARCH, ge=1, le=1000)
    lists: int | None = Field(None, ge=1, le=32768)
    probes: int = Field(vector_index.IVFFLAT_PROBES, ge=1, le=32768)


#: The encoders each modality can use; ``type`` selects the parameter model (encoders.params).
FaceEncoder = Annotated[IdentityCNNParams | DlibParams, Field(discriminator="type")]
TextEncoder = Annotated[LSTMParams | MiniLMParams | SentenceTransformerParams, Field(discriminator="type")]

#: What each modality reads its input from, for "unknown field" messages.
_INPUTS = {
    "tabular": "`columns`",
    "image": "`column` or `path_column`",
    "face": "`column` or `path_column`",
    "text": "`column` or `path_column`",
    "graph": "[embeddings.graph] or [embeddings.neo4j]",
}


class Neo4jSpec(_Strict):
    """Where the Neo4j bridge reads node embeddings from."""

    uri: str
    user: str = "neo4j"
    password_env: str = "NEO4J_PASSWORD"
    database: str | None = None
    label: str
    key_property: str
    property: str | None = None
    algorithm: Literal["fastRP", "graphSage", "node2vec"] | None = None
    relationship_types: list[str] = Field(default_factory=lambda: ["*"])
    config: dict[str, Any] = Field(default_factory=dict)
    page_size: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> Neo4jSpec:
        if (self.property is None) == (self.algorithm is None):
            raise ValueError("set exactly one of 'property' (copy stored vectors) or 'algorithm'")
        return self


class GraphSpec(_Strict):
    """Edges held in Postgres, for native FastRP."""

    edges: str
    source_column: str = "source"
    target_column: str = "target"
    weight_column: str | None = None
    orientation: Literal["undirected", "natural", "reverse"] = "undirected"
    feature_columns: list[str] = Field(default_factory=list)
    iteration_weights: list[float] = Field(default_factory=lambda: [0.0, 1.0, 1.0])
    node_self_influence: float = 0.0
    normalization_strength: float = 0.0
    property_ratio: float = Field(0.0, ge=0.0, le=1.0)
    random_seed: int = 42


class EmbeddingSpec(_Strict):
    """Fields shared by every modality."""

    name: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    table: str = Field(min_length=1)
    key: str = Field(min_length=1)
    modality: str
    dim: int = Field(ge=1, le=16000)
    distance: Distance = "cosine"
    storage: vector_storage.Storage = "vector"
    index: IndexSpec = Field(default_factory=IndexSpec)
    #: The encoder and its parameters; each modality narrows the types it accepts.
    encoder: EncoderParams | None = None
    target: str | None = None
    train_sample: int = Field(200_000, ge=10)
    keep_generations: int = Field(1, ge=0)

    @field_validator("index", mode="before")
    @classmethod
    def _index_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _encoder_table(cls, data: Any) -> Any:
        """Fill the modality's default encoder ``type``; refuse embedding fields in the encoder table."""
        if not isinstance(data, dict) or not isinstance(data.get("encoder"), dict):
            return data
        encoder = dict(data["encoder"])
        default = DEFAULT_ENCODER.get(str(data.get("modality")))
        if default is not None:
            encoder.setdefault("type", default)
        model = PARAMS.get(str(encoder.get("type")))
        for key in encoder:
            if model is not None and key in model.FROM_EMBEDDING:
                raise ValueError(f"{key!r} is a field of the embedding: set it there, not in its encoder table")
        return {**data, "encoder": encoder}

    @model_validator(mode="after")
    def _encoder_dim(self) -> EmbeddingSpec:
        fixed = self.encoder.DIM if self.encoder else None
        if fixed is not None and self.dim != fixed:
            raise ValueError(f"the {self.encoder_type} encoder makes {fixed}-dimensional vectors; set dim = {fixed}")
        return self

    @model_validator(mode="after")
    def _storage_dim(self) -> EmbeddingSpec:
        if self.storage == "halfvec" and self.dim > vector_storage.HALFVEC_MAX_DIM and self.index.kind != "none":
            raise ValueError(
                f"storage = \"halfvec\" indexes up to {vector_storage.HALFVEC_MAX_DIM} dimensions, this "
                f"embedding has dim = {self.dim}; use storage = \"bit\" or index = \"none\""
            )
        return self

    @property
    def source_schema(self) -> str | None:
        return split_qualified(self.table)[0]

    @property
    def source_name(self) -> str:
        return split_qualified(self.table)[1]

    @property
    def target_name(self) -> str:
        return split_qualified(self.target)[1] if self.target else f"{self.name}_embeddings"

    @property
    def encoder_type(self) -> str:
        return self.encoder.type if self.encoder else DEFAULT_ENCODER[self.modality]

    @property
    def input_columns(self) -> list[str]:
        """Source columns whose change must re-embed the row."""
        raise NotImplementedError

    @property
    def from_queue(self) -> bool:
        """Whether rows are embedded one by one from the change queue (capture triggers feed it), or
        the whole embedding is recomputed at once (graphs: one row's change moves its neighbours)."""
        return True


class TabularSpec(EmbeddingSpec):
    modality: Literal["tabular"]
    columns: list[str] = Field(min_length=1)
    encoder: AutoencoderParams = Field(default_factory=AutoencoderParams)

    @property
    def input_columns(self) -> list[str]:
        return list(self.columns)


class MediaSpec(EmbeddingSpec):
    """An input held in the row (``column``) or referenced by a path/``file://`` URI
    (``path_column`` resolved against ``base_dir``, outside which nothing is read unless
    ``allow_any_path``). Only regular files up to ``max_file_bytes`` are read, each within
    ``read_timeout_seconds``."""

    column: str | None = None
    path_column: str | None = None
    base_dir: str | None = None
    allow_any_path: bool = False
    max_file_bytes: int = Field(64 * 2**20, ge=1)
    read_timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_input(self) -> MediaSpec:
        if (self.column is None) == (self.path_column is None):
            raise ValueError("set exactly one of 'column' (data in the row) or 'path_column'")
        if self.path_column is not None and self.base_dir is None and not self.allow_any_path:
            raise ValueError(
                "'path_column' needs 'base_dir' (the folder references are read from, relative to the config "
                "file); to read any file the worker can read, set allow_any_path = true"
            )
        return self

    @property
    def input_column(self) -> str:
        column = self.column or self.path_column
        assert column is not None  # _one_input requires one of them
        return column


class ImageSpec(MediaSpec):
    modality: Literal["image"]
    encoder: ConvAutoencoderParams = Field(default_factory=ConvAutoencoderParams)
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    max_pixels: int = Field(24_000_000, ge=64)

    @property
    def input_columns(self) -> list[str]:
        return [self.input_column]


class FaceSpec(ImageSpec):
    modality: Literal["face"]  # type: ignore[assignment]  # a face spec is an image spec with its own tag
    encoder: FaceEncoder = Field(default_factory=IdentityCNNParams)  # type: ignore[assignment]  # face encoders
    label_column: str | None = None
    detect_faces: bool = True

    @model_validator(mode="after")
    def _labels_for_training(self) -> FaceSpec:
        if self.encoder_type == "identity_cnn" and not self.label_column:
            raise ValueError("the identity_cnn encoder trains on identities: set 'label_column'")
        return self


class TextSearchSpec(_Strict):
    """Keyword search over a text embedding's source text (``vectorsync.hybrid``): a ``tsvector`` of
    the text in each generation's table, with a GIN index."""

    #: A text search configuration of the server (``SELECT cfgname FROM pg_ts_config``).
    language: str = Field("english", min_length=1, max_length=127)


class TextSpec(MediaSpec):
    modality: Literal["text"]
    encoder: TextEncoder = Field(default_factory=LSTMParams)
    max_file_bytes: int = Field(16 * 2**20, ge=1)
    encoding: str = "utf-8"
    max_tokens: int = Field(256, ge=1)
    long_text: Literal["truncate", "chunk"] = "truncate"
    text_search: TextSearchSpec | None = None

    @field_validator("text_search", mode="before")
    @classmethod
    def _text_search_shorthand(cls, value: Any) -> Any:
        """``text_search = true`` (English) or ``text_search = "simple"`` (a language) as shorthands."""
        if value is True:
            return {}
        if value is False:
            return None
        return {"language": value} if isinstance(value, str) else value

    @property
    def input_columns(self) -> list[str]:
        return [self.input_column]


class GraphEmbeddingSpec(EmbeddingSpec):
    modality: Literal["graph"]
    neo4j: Neo4jSpec | None = None
    graph: GraphSpec | None = None
    schedule_seconds: float | None = Field(None, gt=0)

    #: Native GraphSAGE (``encoder = { type = "graphsage", ... }``); without it a native graph is FastRP.
    encoder: GraphSAGEParams | None = None

    @field_validator("encoder", mode="before")
    @classmethod
    def _graphsage_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "graphsage":
            raise ValueError(
                "a graph's encoder table is for GraphSAGE (type = \"graphsage\"); FastRP's settings go in "
                "[embeddings.graph], the bridge's in [embeddings.neo4j]"
            )
        return value

    @model_validator(mode="after")
    def _graphsage_inputs(self) -> GraphEmbeddingSpec:
        if self.encoder is not None and (self.graph is None or not self.graph.feature_columns):
            raise ValueError("GraphSAGE embeds node features: set [embeddings.graph] with feature_columns")
        return self

    @model_validator(mode="after")
    def _one_graph_source(self) -> GraphEmbeddingSpec:
        if (self.neo4j is None) == (self.graph is None):
            raise ValueError("set exactly one of [embeddings.neo4j] (bridge) or [embeddings.graph]")
        return self

    @property
    def encoder_type(self) -> str:
        return "neo4j" if self.neo4j else ("graphsage" if self.encoder is not None else "fastrp")

    @property
    def from_queue(self) -> bool:
        """GraphSAGE embeds a new or changed node from the queue with the current model."""
        return self.encoder_type == "graphsage"

    @property
    def input_columns(self) -> list[str]:
        return list(self.graph.feature_columns) if self.graph else []


AnyEmbedding = Annotated[
    TabularSpec | ImageSpec | FaceSpec | TextSpec | GraphEmbeddingSpec,
    Field(discriminator="modality"),
]


class DatabaseSpec(_Strict):
    url: str | None = None


class WorkerSpec(_Strict):
    batch_size: int = Field(256, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    poll_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    backoff_seconds: float = Field(2.0, ge=0)
    max_backoff_seconds: float = Field(300.0, ge=0)
    batch_deadline_seconds: float = Field(60.0, gt=0)


class Config(_Strict):
    database: DatabaseSpec = Field(default_factory=DatabaseSpec)
    worker: WorkerSpec = Field(default_factory=WorkerSpec)
    embeddings: list[AnyEmbedding] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for spec in self.embeddings:
            if spec.name in seen:
                raise ValueError(f"embedding name {spec.name!r} is declared twice")
            seen.add(spec.name)
        return self

    def embedding(self, name: str) -> EmbeddingSpec:
        for spec in self.embeddings:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.embeddings) or "none"
        raise SpecError(f"no embedding named {name!r} in the config (declared: {known})")

    def select(self, names: list[str] | None) -> list[EmbeddingSpec]:
        return [self.embedding(n) for n in names] if names else list(self.embeddings)


def split_qualified(name: str) -> tuple[str | None, str]:
    """Split ``schema.table`` (a quoted part may contain dots: ``"my.schema"."t"``)."""
    parts: list[str] = []
    current, quoted, i = "", False, 0
    while i < len(name):
        ch = name[i]
        if ch == '"':
            if quoted and i + 1 < len(name) and name[i + 1] == '"':
                current += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise SpecError(f"table name {name!r} has more than two dotted parts")


_MODALITIES: dict[str, type[EmbeddingSpec]] = {
    "tabular": TabularSpec,
    "image": ImageSpec,
    "face": FaceSpec,
    "text": TextSpec,
    "graph": GraphEmbeddingSpec,
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes inside a field's annotation (``X | None``, ``list[X]``, a tagged union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    models = _models_in(annotation)
    return models[0] if len(models) == 1 else None


def _model_at(model: type[BaseModel], path: list[Any]) -> type[BaseModel] | None:
    """The model that the field path ``path`` (as pydantic reports it) leads into."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None or isinstance(part, int):
            continue
        if part in PARAMS and part not in current.model_fields:  # a union's tag: the selected model
            current = PARAMS[part]
        elif part in current.model_fields:
            current = _submodel(current.model_fields[part].annotation)
        else:
            return None
    return current


def _unknown(key: str, path: list[Any], model: type[BaseModel] | None, what: str, where: str) -> str:
    field = ".".join(str(p) for p in [*path, key])
    valid = sorted(model.model_fields) if model is not None else []
    return f"unknown {what} {field!r} in {where}{nearest(key, valid)}"


def _describe(error: Mapping[str, Any], raw: dict[str, Any]) -> str:
    """One validation error in our words, naming the embedding, the field and the nearest valid name."""
    loc, kind = list(error["loc"]), error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not (loc and loc[0] == "embeddings" and len(loc) > 1 and isinstance(loc[1], int)):
        if kind == "extra_forbidden":
            path = [p for p in loc[:-1] if not isinstance(p, int)]
            return _unknown(str(loc[-1]), path, _model_at(Config, path), "setting", "the config")
        return f"config, field {'.'.join(str(p) for p in loc) or '(entry)'!r}: {message}"
    index = loc[1]
    entries = raw.get("embeddings") or []
    name = entries[index].get("name") if index < len(entries) and isinstance(entries[index], dict) else None
    where = f"embedding {name!r}" if name else f"embeddings[{index}]"
    if len(loc) == 2 and kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(error.get("ctx", {}).get("tag", ""))
        valid = ", ".join(_MODALITIES)
        if kind == "union_tag_not_found":
            return f"{where}: set 'modality' to one of {valid}"
        return f"{where}: unknown modality {tag!r}{nearest(tag, _MODALITIES)} (valid: {valid})"
    modality, rest = str(loc[2]), loc[3:]
    spec_model = _MODALITIES.get(modality, EmbeddingSpec)
    if rest and rest[0] == "encoder" and spec_model is not GraphEmbeddingSpec:
        allowed = _models_in(spec_model.model_fields["encoder"].annotation)
        types = [str(m.model_fields["type"].default) for m in allowed]
        if kind == "union_tag_invalid" or (kind == "literal_error" and rest[-1] == "type"):
            tag = str(error.get("ctx", {}).get("tag", error.get("input")))
            return (
                f"{where}, field 'encoder.type': unknown encoder type {tag!r} for a {modality} embedding"
                f"{nearest(tag, types)} (valid: {', '.join(types)})"
            )
        params = rest[1:]
        model = allowed[0] if len(allowed) == 1 else None
        if params and params[0] in PARAMS:
            model, params = PARAMS[params[0]], params[1:]
        if model is not None and params:
            return explain({**error, "loc": tuple(params)}, model, "encoder parameter", f"in {where}")
    if kind == "extra_forbidden":
        key, path = str(rest[-1]), [p for p in rest[:-1] if not isinstance(p, int)]
        text = _unknown(key, path, _model_at(spec_model, path), "field", where)
        if not path and key in {"columns", "column", "path_column", "graph", "neo4j"}:
            text += f" ({modality} embeddings take {_INPUTS[modality]})"
        return text
    if not rest:
        return f"{where}: {message}"
    field = ".".join(str(p) for p in rest)
    value = error.get("input")
    shown = f" = {value!r}" if not isinstance(value, dict) and kind != "value_error" else ""
    return f"{where}, field {field!r}{shown}: {message}"


def parse_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, raw) for e in exc.errors()]
        raise SpecError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"config file {str(path)!r} not found; create it or pass --config PATH")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML: {exc}") from None
    for entry in raw.get("embeddings") or []:
        # a relative base_dir means: relative to the config file, wherever the command runs
        if isinstance(entry, dict) and isinstance(entry.get("base_dir"), str):
            base = Path(entry["base_dir"]).expanduser()
            entry["base_dir"] = str(base if base.is_absolute() else path.resolve().parent / base)
    return parse_config(raw, str(path))
