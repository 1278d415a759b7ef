"""The README documents every config key and every encoder parameter, and nothing that does not
exist: its configuration tables are compared with the spec and parameter models, both ways."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from vectorsync.encoders import params
from vectorsync.sync import spec

README = Path(__file__).resolve().parent.parent / "README.md"

#: Each configuration table's heading -> the model whose own keys it lists (keys of the parent model,
#: documented under the parent's heading, are left out).
TABLES: dict[str, tuple[type[BaseModel], type[BaseModel] | None]] = {
    "`[database]`": (spec.DatabaseSpec, None),
    "`[worker]`": (spec.WorkerSpec, None),
    "`[[embeddings]]`, every modality": (spec.EmbeddingSpec, None),
    "`index`": (spec.IndexSpec, None),
    "`tabular`": (spec.TabularSpec, spec.EmbeddingSpec),
    "`image`, `face`, `text` inputs": (spec.MediaSpec, spec.EmbeddingSpec),
    "`image`": (spec.ImageSpec, spec.MediaSpec),
    "`face`": (spec.FaceSpec, spec.ImageSpec),
    "`text`": (spec.TextSpec, spec.MediaSpec),
    "`[embeddings.text_search]`": (spec.TextSearchSpec, None),
    "`graph`": (spec.GraphEmbeddingSpec, spec.EmbeddingSpec),
    "`[embeddings.graph]`": (spec.GraphSpec, None),
    "`[embeddings.neo4j]`": (spec.Neo4jSpec, None),
    "encoder, every type": (params.EncoderParams, None),
    "encoder `autoencoder`": (params.AutoencoderParams, params.EncoderParams),
    "encoders `conv_autoencoder`, `identity_cnn`": (params.ImageParams, params.EncoderParams),
    "encoder `identity_cnn`, also": (params.IdentityCNNParams, params.ImageParams),
    "encoder `dlib`": (params.DlibParams, params.EncoderParams),
    "encoder `lstm`": (params.LSTMParams, params.EncoderParams),
    "encoders `minilm`, `sentence_transformer`": (params.SentenceModelParams, params.EncoderParams),
    "encoder `minilm`, also": (params.MiniLMParams, params.SentenceModelParams),
    "encoder `sentence_transformer`, also": (params.SentenceTransformerParams, params.SentenceModelParams),
    "encoder `graphsage` (native GraphSAGE)": (params.GraphSAGEParams, params.EncoderParams),
}


def documented() -> dict[str, set[str]]:
    """Heading -> the keys in the first column of the table under it (the level-4 headings of the
    configuration reference)."""
    text = README.read_text()
    section = text[text.index("## Configuration reference") :]
    section = section[: section.index("\n## ", 1)]
    tables: dict[str, set[str]] = {}
    heading = None
    for line in section.splitlines():
        if line.startswith("#### "):
            heading = line.removeprefix("#### ").strip()
            tables[heading] = set()
        elif line.startswith("#"):
            heading = None
        elif heading is not None and line.startswith("| `"):
            tables[heading] |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return tables


def own_keys(model: type[BaseModel], parent: type[BaseModel] | None) -> set[str]:
    inherited = set(parent.model_fields) if parent else set()
    from_embedding = set(getattr(model, "FROM_EMBEDDING", ()))
    return set(model.model_fields) - inherited - from_embedding


def test_every_configuration_table_lists_exactly_its_models_keys():
    tables = documented()
    assert set(tables) == set(TABLES), "every #### table in the README is mapped here, and only those"
    for heading, (model, parent) in TABLES.items():
        assert tables[heading] == own_keys(model, parent), heading


def test_every_encoder_parameter_is_documented_once_for_its_encoder():
    tables = documented()
    for type_name, model in params.PARAMS.items():
        covering = [h for h, (m, _) in TABLES.items() if issubclass(model, m) and h.startswith("encoder")]
        keys = [key for heading in covering for key in tables[heading]]
        assert sorted(keys) == sorted(set(model.model_fields) - set(model.FROM_EMBEDDING)), type_name


def test_every_modality_is_documented():
    tables = documented()
    modality_models = {"tabular": spec.TabularSpec, "image": spec.ImageSpec, "face": spec.FaceSpec,
                       "text": spec.TextSpec, "graph": spec.GraphEmbeddingSpec}
    for name, model in modality_models.items():
        covering = [h for h, (m, _) in TABLES.items() if issubclass(model, m) and not h.startswith("encoder")]
        keys = {key for heading in covering for key in tables[heading]}
        assert keys == set(model.model_fields), name
