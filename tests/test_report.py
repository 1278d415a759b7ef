"""`vectorsync report`: the training curve kept with each model version, and kNN label agreement of
the model against a same-dimension baseline computed on the same rows, as JSON and as HTML."""

from __future__ import annotations

import json

from vectorsync.sync.demo import load_wine_table

SPEC = """
[[embeddings]]
name = "wine"
table = "demo_wine"
key = "id"
modality = "tabular"
dim = 4
columns = {columns}
encoder = {{ seed = 7, epochs = 30 }}
"""


def test_report_compares_the_model_with_a_pca_baseline_and_keeps_the_training_curve(conn, write_config, cli, tmp_path):
    columns = load_wine_table(conn)
    config = write_config(SPEC.format(columns=json.dumps(columns)))
    for args in (["migrate"], ["train", "wine"], ["sync"]):
        assert cli(*args, config=config).code == 0

    result = cli("report", "wine", "--label", "cultivar", "--json", config=config)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    curve = report["versions"][0]["history"]
    assert [p["epoch"] for p in curve] == list(range(1, 31))
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert report["held_out"]["holdout_reconstruction_mse"] > 0
    agreement = report["agreement"]
    assert agreement["rows"] == 178 and agreement["baseline_method"] == "PCA" and agreement["baseline_dim"] == 4
    assert agreement["model"] > agreement["chance"] and agreement["baseline"] > agreement["chance"]
    beats = "beats" if agreement["model"] > agreement["baseline"] else "does not beat"
    assert beats in report["verdict"] or "matches" in report["verdict"]
    example = report["examples"][0]
    assert len(example["neighbours"]) == 5 and all(n["label"] for n in example["neighbours"])

    html = tmp_path / "wine.html"
    result = cli("report", "wine", "--label", "cultivar", "-o", str(html), config=config)
    assert result.code == 0, result.err
    page = html.read_text()
    assert page.count('src="data:image/png;base64,') == 2  # training curve and agreement plot
    assert report["verdict"].replace("'", "&#39;") in page


def test_report_names_a_missing_label_column(conn, write_config, cli):
    columns = load_wine_table(conn)
    config = write_config(SPEC.format(columns=json.dumps(columns)))
    for args in (["migrate"], ["train", "wine"], ["sync"]):
        assert cli(*args, config=config).code == 0
    result = cli("report", "wine", "--label", "colour", "--json", config=config)
    assert result.code == 1 and "'colour'" in result.err
