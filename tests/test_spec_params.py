"""Encoder parameters and modality fields are validated when the spec loads, and refused in our
words: the embedding, the setting, and the nearest valid name."""

from __future__ import annotations

from typing import Any

import pytest

from vectorsync.encoders.params import AutoencoderParams, LSTMParams
from vectorsync.sync.spec import SpecError, parse_config

TABULAR = {"name": "cancer", "table": "t", "key": "id", "modality": "tabular", "dim": 4, "columns": ["a"]}
TEXT = {"name": "notes", "table": "t", "key": "id", "modality": "text", "dim": 8, "column": "body"}


def problem(entry: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        parse_config({"embeddings": [entry]})
    return str(caught.value)


def test_unknown_encoder_parameter_names_embedding_key_and_nearest_name():
    message = problem({**TABULAR, "encoder": {"epoch": 5}})
    assert "unknown encoder parameter 'epoch' in embedding 'cancer'; did you mean 'epochs'?" in message


def test_wrong_parameter_type_names_the_setting_and_value():
    message = problem({**TABULAR, "encoder": {"epochs": "five"}})
    assert "encoder parameter epochs = 'five' in embedding 'cancer' is not valid" in message


def test_each_encoder_type_has_its_own_parameters():
    assert "did you mean 'epochs'" in problem({**TEXT, "encoder": {"type": "lstm", "epoch": 3}})
    # minilm is pretrained: it has no epochs
    assert "unknown encoder parameter 'epochs' in embedding 'notes'" in problem(
        {**TEXT, "dim": 384, "encoder": {"type": "minilm", "epochs": 3}}
    )
    assert "encoder parameter 'path' in embedding 'notes' is required" in problem(
        {**TEXT, "encoder": {"type": "sentence_transformer"}}
    )


def test_precision_is_refused_on_encoders_that_do_not_support_it():
    assert "unknown encoder parameter 'precision' in embedding 'notes'" in problem(
        {**TEXT, "encoder": {"type": "lstm", "precision": "int8"}}
    )
    assert "unknown encoder parameter 'precision' in embedding 'cancer'" in problem(
        {**TABULAR, "encoder": {"precision": "int8"}}
    )
    minilm = {**TEXT, "dim": 384}
    assert "encoder parameter precision = 'int4' in embedding 'notes' is not valid" in problem(
        {**minilm, "encoder": {"type": "minilm", "precision": "int4"}}
    )
    assert "precision = 'int8' runs on the CPU (ONNX Runtime)" in problem(
        {**minilm, "encoder": {"type": "minilm", "precision": "int8", "device": "cuda"}}
    )
    assert parse_config({"embeddings": [{**minilm, "encoder": {"type": "minilm", "precision": "int8"}}]})


def test_encoder_type_must_fit_the_modality():
    message = problem({**TEXT, "encoder": {"type": "lstmm"}})
    assert "unknown encoder type 'lstmm' for a text embedding; did you mean 'lstm'?" in message
    assert "unknown encoder type 'conv_autoencoder' for a tabular embedding" in problem(
        {**TABULAR, "encoder": {"type": "conv_autoencoder"}}
    )


def test_pretrained_encoders_fix_the_dim():
    assert "set dim = 384" in problem({**TEXT, "dim": 64, "encoder": {"type": "minilm"}})


def test_embedding_fields_are_refused_inside_the_encoder_table():
    message = problem({**TEXT, "encoder": {"max_tokens": 64}})
    assert "'max_tokens' is a field of the embedding: set it there" in message


def test_modality_typo_lists_valid_modalities():
    message = problem({**TABULAR, "modality": "tabluar"})
    assert "embedding 'cancer': unknown modality 'tabluar'; did you mean 'tabular'?" in message
    assert "tabular, image, face, text, graph" in message and "Input tag" not in message


def test_image_embedding_with_columns_says_which_inputs_it_takes():
    entry = {**TABULAR, "name": "photos", "modality": "image"}
    message = problem(entry)
    assert "unknown field 'columns' in embedding 'photos'" in message
    assert "image embeddings take `column` or `path_column`" in message
    assert "Extra inputs are not permitted" not in message


def test_unknown_field_in_a_section_suggests_the_nearest_name():
    assert "unknown field 'index.mm' in embedding 'cancer'; did you mean 'm'?" in problem(
        {**TABULAR, "index": {"mm": 8}}
    )
    with pytest.raises(SpecError, match="unknown setting 'databse' in the config; did you mean 'database'"):
        parse_config({"databse": {"url": "postgresql://"}})


def test_a_graph_encoder_table_is_graphsage_only():
    entry = {"name": "g", "table": "n", "key": "id", "modality": "graph", "dim": 8, "graph": {"edges": "e"}}
    assert "a graph's encoder table is for GraphSAGE" in problem({**entry, "encoder": {"epochs": 3}})
    assert "GraphSAGE embeds node features: set [embeddings.graph] with feature_columns" in problem(
        {**entry, "encoder": {"type": "graphsage"}}
    )
    with_features = {**entry, "graph": {"edges": "e", "feature_columns": ["f"]}}
    assert "fan_outs has 1 values but layers is 2" in problem(
        {**with_features, "encoder": {"type": "graphsage", "fan_outs": [5]}}
    )
    spec = parse_config({"embeddings": [{**with_features, "encoder": {"type": "graphsage", "layers": 3}}]})
    assert spec.embeddings[0].encoder_type == "graphsage"
    assert spec.embeddings[0].encoder.hop_fan_outs == [25, 10, 10]


def test_the_encoder_receives_its_validated_parameters():
    from vectorsync.sync.models import new_encoder

    config = parse_config({"embeddings": [{**TEXT, "max_tokens": 32, "encoder": {"epochs": 2}}]})
    encoder = new_encoder(config.embeddings[0])
    assert isinstance(encoder.options, LSTMParams)
    assert (encoder.options.epochs, encoder.options.max_tokens, encoder.options.hidden_size) == (2, 32, 64)
    tabular = new_encoder(parse_config({"embeddings": [TABULAR]}).embeddings[0])
    assert tabular.options == AutoencoderParams()


def test_migrate_refuses_a_text_embedding_on_a_numeric_column(conn, write_config, cli):
    conn.execute("CREATE TABLE notes (id integer PRIMARY KEY, body integer, title text)")
    config = write_config(
        """
        [[embeddings]]
        name = "notes"
        table = "notes"
        key = "id"
        modality = "text"
        dim = 8
        column = "body"
        """
    )
    result = cli("migrate", config=config)
    assert result.code == 1
    assert "field 'column': column 'body' of table 'notes' is integer; a text embedding needs text" in result.err
    assert conn.execute("SELECT to_regclass('vectorsync.embeddings')").fetchone()[0] is None
    config.write_text(config.read_text().replace('column = "body"', 'column = "title"'))
    assert cli("migrate", config=config).code == 0
