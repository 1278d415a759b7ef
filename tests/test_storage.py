"""Quantized storage (``storage = "halfvec" | "bit"``): what the generation stores and indexes, that
searches through the SQL functions and the ORM answer as ``vector`` storage does, and that changing
it is a new generation (tests/test_compat_pg16.py: a server without it refuses it in one line)."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from sqlalchemy import REAL, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.test_embedding_sql import CATEGORIES, clustered, exact, vector_text
from tests.worker_support import create_items, insert_items, scalar
from vectorsync.embedding_sql import attach_embedding, nearest
from vectorsync.sync import catalog, schema, sink
from vectorsync.sync.bulk import create_index, drop_index
from vectorsync.sync.spec import parse_config

ROWS, DIM, K = 3000, 32, 10
QUERIES = range(0, ROWS, 150)


def stored(conn: psycopg.Connection, url: str, storage: str, *, rows: int = ROWS) -> np.ndarray:
    """Table ``items`` (id, category, price) and embedding ``items`` with ``storage``, holding known
    clustered vectors, loaded then indexed as a backfill is."""
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, category text, price real)")
    conn.execute(
        "INSERT INTO items SELECT g, (%s::text[])[g %% 4 + 1], g FROM generate_series(0, %s) g", (CATEGORIES, rows - 1)
    )
    config = parse_config({"embeddings": [{
        "name": "items", "table": "items", "key": "id", "modality": "tabular", "dim": DIM, "storage": storage,
        "columns": ["price"],
    }]})
    schema.upgrade(url, config)
    emb = catalog.load(conn, config.embeddings[0])
    vectors = clustered(rows, DIM, seed=3)
    drop_index(conn, emb)
    with conn.transaction():
        sink.upsert(conn, emb, [str(i) for i in range(rows)], vectors, 1)
    create_index(conn, emb)
    conn.execute("ANALYZE items, vectorsync.items_g1")
    conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
    conn.execute("UPDATE vectorsync.embeddings SET current_version = 1")
    return vectors


def recall(found: list[str], vectors: np.ndarray, query: int, *, among: np.ndarray | None = None) -> float:
    """Share of the exact K nearest (of ``among``, the query row left out) that ``found`` holds."""
    d = exact(vectors, vectors[query])
    d[query] = np.inf
    if among is not None:
        d[~among] = np.inf
    return len(set(np.argsort(d)[:K].astype(str)) & set(found)) / K


@pytest.mark.parametrize("storage", ["halfvec", "bit"])
def test_quantized_storage_answers_as_exact_search_does(conn, db_url, storage):
    vectors = stored(conn, db_url, storage)
    column, index = conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod), pg_get_indexdef(i.indexrelid) FROM pg_attribute a "
        "JOIN pg_index i ON i.indrelid = a.attrelid WHERE a.attrelid = 'vectorsync.items_g1'::regclass "
        "AND a.attname = 'embedding' AND NOT i.indisprimary"
    ).fetchone()
    if storage == "halfvec":
        assert column == f"halfvec({DIM})" and "halfvec_cosine_ops" in index
    else:  # the full vector is kept; the index holds its binary quantization
        assert column == f"vector({DIM})" and f"bit({DIM})) bit_hamming_ops" in index

    recalls = []
    for q in QUERIES:
        got = conn.execute("SELECT key, distance FROM vectorsync.nearest('items', %s, %s)", (str(q), K)).fetchall()
        assert [d for _, d in got] == sorted(d for _, d in got)
        assert len(got) == K and str(q) not in {key for key, _ in got}
        recalls.append(recall([key for key, _ in got], vectors, q))
        if storage == "bit":  # re-ranked: the distances are the full-precision ones
            assert [d for _, d in got] == pytest.approx(exact(vectors, vectors[q])[[int(k) for k, _ in got]], abs=1e-5)
    assert np.mean(recalls) >= 0.9, recalls

    blue = np.array([CATEGORIES[i % 4] == "blue" for i in range(ROWS)])
    got = conn.execute(
        "SELECT key FROM vectorsync.nearest_to_where('items', %s, %s, %s)",
        (vector_text(vectors[7]), K, json.dumps({"category": "blue"})),
    ).fetchall()
    assert len(got) == K and all(blue[int(key)] for key, in got)
    assert recall([key for key, in got], vectors, 7, among=blue) >= 0.8

    graph = conn.execute("SELECT key, neighbour, rank FROM vectorsync.knn_join('items', '{0,150}', 5)").fetchall()
    assert [(key, rank) for key, _, rank in graph] == [(key, r) for key in ("0", "150") for r in range(1, 6)]
    nearest0 = [n for n, _ in conn.execute("SELECT * FROM vectorsync.nearest('items', '0', 5)")]
    assert [n for key, n, _ in graph if key == "0"] == nearest0


def test_the_index_serves_searches_through_the_view(conn, db_url):
    """A bit index matches the quantization written against the target view, as the ORM writes it."""
    vectors = stored(conn, db_url, "bit")
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute(
        f"EXPLAIN SELECT id FROM items_embeddings ORDER BY binary_quantize(embedding)::bit({DIM}) "
        f"<~> binary_quantize(%s::vector)::bit({DIM}) LIMIT 10", (vector_text(vectors[0]),)
    ))
    assert "items_g1_embedding_idx" in plan


def item_model(storage: str) -> type:
    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        category: Mapped[str | None] = mapped_column(Text)
        price: Mapped[float | None] = mapped_column(REAL)

    attach_embedding(Item, "items", dim=DIM, storage=storage)
    return Item


@pytest.mark.parametrize("storage", ["halfvec", "bit"])
def test_orm_searches_quantized_storage(conn, db_url, storage):
    vectors = stored(conn, db_url, storage, rows=1500)
    Item = item_model(storage)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    try:
        with Session(engine) as session:
            item = session.get(Item, 40)
            got = session.execute(nearest(Item, item, k=K)).all()
            by_vector = session.execute(nearest(Item, vectors[40], k=K + 1)).all()
            blue = session.execute(nearest(Item, vectors[40], k=K, where={"category": "blue"})).all()
            if storage == "halfvec":
                assert len(item.embedding_row.embedding) == DIM  # HALFVEC reads it back as a list
    finally:
        engine.dispose()
    assert len(got) == K and all(row.id != 40 for row, _ in got)
    assert recall([str(row.id) for row, _ in got], vectors[:1500], 40) >= 0.8
    assert [d for _, d in got] == sorted(d for _, d in got)
    assert by_vector[0][0].id == 40 and {r.id for r, _ in by_vector[1:]} == {r.id for r, _ in got}
    assert len(blue) == K and all(row.category == "blue" for row, _ in blue)


def test_a_storage_change_is_a_generation_that_sync_swaps_in(conn, db_url, tmp_path, cli):
    create_items(conn, 400)
    config = tmp_path / "vectorsync.toml"
    spec = """
[[embeddings]]
name = "items"
table = "items"
key = "id"
modality = "tabular"
dim = 8
storage = "{storage}"
columns = ["a", "b", "c", "kind"]
encoder = {{ type = "autoencoder", seed = 1, epochs = 2, hidden = [16] }}
"""
    config.write_text(spec.format(storage="vector"))
    conn.execute("CREATE ROLE storage_reader")
    conn.execute("GRANT SELECT ON items TO storage_reader")
    assert cli("migrate", config=config).code == 0
    assert cli("sync", "items", config=config).code == 0
    conn.execute("GRANT SELECT ON items_embeddings TO storage_reader")
    before = conn.execute("SELECT key FROM vectorsync.nearest('items', '7', 5)").fetchall()

    config.write_text(spec.format(storage="halfvec"))
    assert cli("migrate", config=config).code == 0
    # the new generation embeds with the model in service: no training needed
    assert conn.execute(
        "SELECT generation, state, storage, model_version FROM vectorsync.generations ORDER BY generation"
    ).fetchall() == [(1, "serving", "vector", 1), (2, "building", "halfvec", 1)]
    assert scalar(conn, "SELECT pg_typeof(embedding)::text FROM items_embeddings LIMIT 1") == "vector"
    assert cli("sync", "items", config=config).code == 0
    assert scalar(conn, "SELECT generation FROM vectorsync.generations WHERE state = 'serving'") == 2
    assert scalar(conn, "SELECT pg_typeof(embedding)::text FROM items_embeddings LIMIT 1") == "halfvec"
    assert scalar(conn, "SELECT count(*) FROM items_embeddings") == 400
    assert scalar(conn, "SELECT has_table_privilege('storage_reader', 'items_embeddings', 'SELECT')")
    after = conn.execute("SELECT key FROM vectorsync.nearest('items', '7', 5)").fetchall()
    assert len(set(before) & set(after)) >= 4  # the same model, stored in half precision
    insert_items(conn, 400, 2)  # a few rows: written with one INSERT of their values
    assert cli("sync", "items", config=config).code == 0
    assert scalar(conn, "SELECT count(*) FROM vectorsync.items_g2 WHERE id >= 400") == 2

    assert cli("rollback", "items", config=config).code == 0
    assert scalar(conn, "SELECT pg_typeof(embedding)::text FROM items_embeddings LIMIT 1") == "vector"


def test_halfvec_beyond_its_index_limit_is_refused_in_the_spec():
    with pytest.raises(Exception, match="indexes up to 4000 dimensions"):
        parse_config({"embeddings": [{
            "name": "wide", "table": "t", "key": "id", "modality": "tabular", "dim": 5000, "storage": "halfvec",
            "columns": ["x"],
        }]})
