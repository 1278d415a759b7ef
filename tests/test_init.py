"""`vectorsync init`: the proposal finds each modality in a real database, writes a config that
validates, never overwrites one without --force, and the config runs migrate, train and sync."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import psycopg
import pytest

from tests import explorer_data
from vectorsync.sync import introspect
from vectorsync.sync.spec import load_config


@pytest.fixture
def database(conn: psycopg.Connection, tmp_path: Path) -> psycopg.Connection:
    explorer_data.load(conn, tmp_path)
    return conn


def by_name(config_path: Path) -> dict[str, dict]:
    return {e["name"]: e for e in tomllib.loads(config_path.read_text())["embeddings"]}


def test_proposal_finds_each_modality_and_reports_tables_without_a_key(database, tmp_path):
    result = introspect.propose(database, config_dir=tmp_path)
    proposed = {(p.table, p.modality): p.entry for p in result.proposals}
    assert proposed[("demo_wine", "tabular")]["columns"][:2] == ["cultivar", "alcohol"]
    assert proposed[("digits", "image")]["column"] == "image"
    assert proposed[("photos", "image")]["path_column"] == "path"
    assert proposed[("photos", "image")]["base_dir"] == "."
    assert proposed[("articles", "text")]["column"] == "body"
    assert proposed[("articles", "tabular")]["columns"] == ["topic"]
    graph = proposed[("papers", "graph")]["graph"]
    assert (graph["edges"], graph["source_column"], graph["target_column"]) == ("citations", "citing", "cited")
    assert all(p.entry["key"] == "id" for p in result.proposals)
    skipped = dict(result.skipped)
    assert "no primary key" in skipped["readings"] and "ADD COLUMN id" in skipped["readings"]


def test_self_reference_is_a_graph(conn, tmp_path):
    conn.execute("CREATE TABLE staff (id int PRIMARY KEY, boss int REFERENCES staff, salary real)")
    conn.execute("INSERT INTO staff VALUES (1, NULL, 10), (2, 1, 5), (3, 1, 6)")
    result = introspect.propose(conn, ["staff"], config_dir=tmp_path)
    graph = next(p.entry for p in result.proposals if p.modality == "graph")
    assert graph["graph"] == {"edges": "staff", "source_column": "id", "target_column": "boss"}


def test_init_never_overwrites_without_force(database, cli, tmp_path):
    config = tmp_path / "vectorsync.toml"
    config.write_text("# mine\n")
    result = cli("init", "--yes", config=config)
    assert result.code == 1 and "--force" in result.err
    assert config.read_text() == "# mine\n"
    assert cli("init", "--yes", "--force", "demo_wine", config=config).code == 0
    assert list(by_name(config)) == ["demo_wine"]


def test_init_yes_then_migrate_train_sync(database, cli, tmp_path):
    config = tmp_path / "vectorsync.toml"
    result = cli("init", "--yes", config=config)
    assert result.code == 0, result.err
    assert "readings" in result.err and "no primary key" in result.err
    text = config.read_text()
    assert "# image: image: bytea holding images" in text and "not proposed: readings" in text
    specs = {s.name: s for s in load_config(config).embeddings}
    assert {s.modality for s in specs.values()} == {"tabular", "image", "text", "graph"}
    assert cli("migrate", config=config).code == 0
    result = cli("train", "demo_wine", config=config)
    assert result.code == 0, result.err
    result = cli("sync", config=config)
    assert result.code == 0, result.err
    for spec in specs.values():
        source = database.execute(f'SELECT count(*) FROM "{spec.table}"').fetchone()[0]
        embedded = database.execute(f'SELECT count(*) FROM "{spec.target_name}"').fetchone()[0]
        assert embedded == source, spec.name

    # the graph's report compares FastRP with the raw adjacency rows on the two citation communities
    result = cli("report", "papers_graph", "--label", "community", "--json", config=config)
    assert result.code == 0, result.err
    agreement = json.loads(result.out)["agreement"]
    assert agreement["baseline_method"] == "raw features" and agreement["rows"] == explorer_data.PAPERS
    assert agreement["model"] > agreement["chance"]
