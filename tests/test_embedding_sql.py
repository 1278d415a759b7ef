"""embedding_sql: SQL similarity functions, the SQLAlchemy integration, and index management.

Most tests write known vectors with the sink (sync.sink.upsert) so that results can be checked
against exact search in numpy; the index-management tests run the real train → sync pipeline.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import REAL, Text, create_engine, event, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from vectorsync.embedding_sql import attach_embedding, distance, embedding_distance, nearest, similar_to
from vectorsync.sync import capabilities, catalog, schema, sink
from vectorsync.sync.bulk import create_index, drop_index
from vectorsync.sync.spec import parse_config

CATEGORIES = ["red", "green", "blue", "grey"]


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Vectors in gaussian clusters, like real embeddings (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def exact(vectors: np.ndarray, query: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Distances from query to every vector, as pgvector computes them."""
    if metric == "cosine":
        return 1 - vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    if metric == "l2":
        return np.linalg.norm(vectors - query, axis=1)
    return -(vectors @ query)


def make_embedding(
    conn: psycopg.Connection, url: str, n: int = 2000, dim: int = 16, *, distance: str = "cosine",
    index: dict | None = None, seed: int = 0, clusters: int = 40,
) -> tuple[catalog.Embedding, np.ndarray]:
    """Table ``items`` (id, category, price) and embedding ``items`` holding known vectors."""
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, category text, price real)")
    conn.execute(
        "INSERT INTO items SELECT g, CASE WHEN g %% 500 = 0 THEN 'rare' ELSE (%s::text[])[g %% 4 + 1] END, g "
        "FROM generate_series(0, %s) g",
        (CATEGORIES, n - 1),
    )
    spec = {"name": "items", "table": "items", "key": "id", "modality": "tabular", "dim": dim,
            "distance": distance, "columns": ["price"], "index": index or {}}
    config = parse_config({"embeddings": [spec]})
    schema.upgrade(url, config)
    emb = catalog.load(conn, config.embeddings[0])
    vectors = clustered(n, dim, seed, clusters)
    drop_index(conn, emb)  # load, then build the index: as sync does for a backfill
    with conn.transaction():
        sink.upsert(conn, emb, [str(i) for i in range(n)], vectors, 1)
    create_index(conn, emb)
    conn.execute("ANALYZE items, items_embeddings")  # planner statistics, as autovacuum would gather
    conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
    conn.execute("UPDATE vectorsync.embeddings SET current_version = 1")
    return emb, vectors


@pytest.fixture
def items(conn, db_url):
    return make_embedding(conn, db_url)


def categories(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT id::text, category FROM items").fetchall())


def explain(conn: psycopg.Connection, query_text: str, types: str, args: list) -> str:
    """EXPLAIN of ``query_text`` (with $n parameters) run with ``args``, as the functions run it."""
    conn.execute(sql.SQL("PREPARE q ({}) AS {}").format(sql.SQL(types), sql.SQL(query_text)))
    try:
        plan = conn.execute(
            sql.SQL("EXPLAIN (COSTS OFF) EXECUTE q ({})").format(sql.SQL(", ").join(map(sql.Literal, args)))
        ).fetchall()
    finally:
        conn.execute("DEALLOCATE q")
    return "\n".join(row[0] for row in plan)


def vector_text(v: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


# --- SQL functions -------------------------------------------------------------------------------


def test_nearest_where_returns_the_nearest_rows_matching_the_filter(conn, items):
    _, vectors = items
    got = conn.execute("SELECT key, distance FROM vectorsync.nearest_where('items', '7', 10, %s)",
                       (json.dumps({"category": "blue"}),)).fetchall()
    cats = categories(conn)
    assert len(got) == 10 and all(cats[key] == "blue" for key, _ in got)
    blue = np.array([cats[str(i)] == "blue" and i != 7 for i in range(len(vectors))])
    d = exact(vectors, vectors[7])
    expected = set(np.flatnonzero(blue)[np.argsort(d[blue])[:10]].astype(str))
    assert len(expected & {key for key, _ in got}) >= 9
    assert [dist for _, dist in got] == sorted(dist for _, dist in got)


def test_nearest_to_where_filters_on_several_columns_and_null(conn, items):
    _, vectors = items
    got = conn.execute("SELECT key FROM vectorsync.nearest_to_where('items', %s, 5, %s)",
                       (vector_text(vectors[3]), json.dumps({"category": "grey", "price": 3}))).fetchall()
    assert got == [("3",)]
    conn.execute("UPDATE items SET category = NULL WHERE id IN (10, 11)")
    got = conn.execute("SELECT key FROM vectorsync.nearest_to_where('items', %s, 5, '{\"category\": null}')",
                       (vector_text(vectors[3]),)).fetchall()
    assert sorted(got) == [("10",), ("11",)]


def test_selective_filter_falls_back_to_exact_search(conn, items):
    _, vectors = items
    got = conn.execute("SELECT key FROM vectorsync.nearest_to_where('items', %s, 10, '{\"category\": \"rare\"}')",
                       (vector_text(vectors[1]),)).fetchall()
    rare = [str(i) for i in range(0, len(vectors), 500)]
    d = exact(vectors, vectors[1])
    assert [k for (k,) in got] == sorted(rare, key=lambda k: d[int(k)])


def one_percent(conn: psycopg.Connection, n: int) -> np.ndarray:
    """Marks 1 % of the ``items`` rows with category 'one'; returns their keys."""
    conn.execute("UPDATE items SET category = 'one' WHERE id % 100 = 1")
    conn.execute("ANALYZE items")
    return np.arange(1, n, 100)


def test_filter_keeping_one_percent_finds_the_exact_filtered_neighbours(conn, db_url):
    _, vectors = make_embedding(conn, db_url, n=3000)
    ones = one_percent(conn, 3000)
    for q in range(0, 3000, 300):
        got = conn.execute("SELECT key, distance FROM vectorsync.nearest_to_where('items', %s, 10, %s)",
                           (vector_text(vectors[q]), '{"category": "one"}')).fetchall()
        expected = ones[np.argsort(exact(vectors[ones], vectors[q]))[:10]].astype(str)
        assert [key for key, _ in got] == list(expected)


def test_a_filter_the_planner_expects_to_keep_few_rows_is_answered_exactly(conn, items):
    """2000 rows, k = 10: at most 2 * sqrt(10 * 2000) = 283 matching rows are compared one by one;
    the index serves a filter keeping a quarter of them."""
    _, vectors = items
    one_percent(conn, 2000)

    def search(category: str) -> tuple[bool, str | None, list[str]]:
        with conn.transaction():
            selective = conn.execute("SELECT vectorsync._selective(vectorsync._embedding('items'), %s, 10)",
                                     (json.dumps({"category": category}),)).fetchone()[0]
            got = conn.execute("SELECT key FROM vectorsync.nearest_to_where('items', %s, 10, %s)",
                               (vector_text(vectors[5]), json.dumps({"category": category}))).fetchall()
            setting = conn.execute("SELECT current_setting('hnsw.iterative_scan', true)").fetchone()[0]
        return selective, setting, [key for key, in got]

    selective, setting, got = search("one")
    assert selective and setting in (None, "", "off")  # no index walk was set up
    ones = np.arange(1, 2000, 100)
    assert got == [str(i) for i in ones[np.argsort(exact(vectors[ones], vectors[5]))[:10]]]
    selective, _, got = search("blue")
    assert not selective and len(got) == 10


def test_filtered_search_scans_the_index_iteratively_where_pgvector_has_it(conn, items):
    iterative = capabilities.detect(conn).has("iterative index scans")
    with conn.transaction():
        conn.execute("SELECT * FROM vectorsync.nearest_where('items', '7', 10, '{\"category\": \"blue\"}')").fetchall()
        setting = conn.execute("SELECT current_setting('hnsw.iterative_scan', true)").fetchone()[0]
    assert (setting == "relaxed_order") == iterative
    if not iterative:
        return
    # The planner compares a small table exactly; with sorting off it must walk the index, which
    # alone yields the k rows of a filter keeping 1 %: the plain scan stops at ef_search candidates.
    one_percent(conn, 2000)
    args = [vector_text(items[1][7]), "7", 10, '{"category": "one"}']
    e = "(SELECT e FROM vectorsync.embeddings e WHERE name = 'items')"
    filtered = conn.execute(f"SELECT vectorsync._search_sql({e}, %s)", (args[3],)).fetchone()[0]

    def through_the_index(iterative: bool) -> int:
        with conn.transaction():
            conn.execute("SET LOCAL enable_sort = off")
            if iterative:
                conn.execute("SELECT vectorsync._iterative_scan()")
            assert "Index Scan using items_g1_embedding" in explain(
                conn, filtered, "vector, text, integer, jsonb", args)
            conn.execute(sql.SQL("PREPARE q (vector, text, integer, jsonb) AS {}").format(sql.SQL(filtered)))
            found = conn.execute(sql.SQL("EXECUTE q ({})").format(sql.SQL(", ").join(map(sql.Literal, args))))
            rows = len(found.fetchall())
            conn.execute("DEALLOCATE q")
            return rows

    assert through_the_index(iterative=False) < 10 == through_the_index(iterative=True)


def test_filter_cannot_inject_sql(conn, items):
    rows = conn.execute("SELECT count(*) FROM vectorsync.nearest_where('items', '7', 10, %s)",
                        (json.dumps({"category": "x' OR '1'='1"}),)).fetchone()[0]
    assert rows == 0
    with pytest.raises(psycopg.errors.RaiseException, match='column "category; DROP TABLE items" not found'):
        conn.execute("SELECT * FROM vectorsync.nearest_where('items', '7', 10, %s)",
                     (json.dumps({"category; DROP TABLE items": 1}),))
    with pytest.raises(psycopg.errors.RaiseException, match="must be a JSON object"):
        conn.execute("SELECT * FROM vectorsync.nearest_where('items', '7', 10, '[1]')")
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 2000


def test_nearest_to_where_refuses_a_vector_of_the_wrong_dimension(conn, items):
    with pytest.raises(psycopg.errors.RaiseException, match="has dimension 16, the query vector has 3"):
        conn.execute("SELECT * FROM vectorsync.nearest_to_where('items', '[1,2,3]', 5)")


def test_knn_join_ranks_each_keys_neighbours(conn, items):
    rows = conn.execute("SELECT key, neighbour, distance, rank FROM vectorsync.knn_join('items', %s, 4)",
                        (["5", "6"],)).fetchall()
    assert [(r[0], r[3]) for r in rows] == [(key, rank) for key in ("5", "6") for rank in (1, 2, 3, 4)]
    for key in ("5", "6"):
        expected = conn.execute("SELECT key, distance FROM vectorsync.nearest('items', %s, 4)", (key,)).fetchall()
        assert [(r[1], r[2]) for r in rows if r[0] == key] == expected
    assert conn.execute("SELECT count(*) FROM vectorsync.knn_join('items', NULL, 3)").fetchone()[0] == 3 * 2000


def test_k_above_ef_search_still_returns_k_rows(conn, items):
    assert conn.execute("SELECT count(*) FROM vectorsync.nearest_where('items', '1', 100)").fetchone()[0] == 100
    assert conn.execute("SELECT count(*) FROM vectorsync.knn_join('items', ARRAY['1'], 100)").fetchone()[0] == 100


def test_similarity_queries_use_the_vector_index(conn, items):
    _, vectors = items
    e = "vectorsync._embedding('items')"  # as the query functions resolve it: the generation in service
    q = vector_text(vectors[0])
    types = "vector, text, integer, jsonb"
    unfiltered = conn.execute(f"SELECT vectorsync._search_sql({e}, '{{}}')").fetchone()[0]
    plan = explain(conn, unfiltered, types, [q, "0", 10, "{}"])
    assert "Index Scan using items_g1_embedding_idx" in plan and "Order By: (embedding <=> " in plan
    filtered = conn.execute(f"SELECT vectorsync._search_sql({e}, %s)", ('{"category": "red"}',)).fetchone()[0]
    plan = explain(conn, filtered, types, [q, "0", 10, '{"category": "red"}'])
    assert "Index Scan using items_g1_embedding_idx" in plan
    fallback = conn.execute(f"SELECT vectorsync._search_sql({e}, '{{}}', exact => true)").fetchone()[0]
    assert "embedding_idx" not in explain(conn, fallback, types, [q, "0", 10, "{}"])
    join = conn.execute(f"SELECT vectorsync._knn_join_sql({e})").fetchone()[0]
    plan = explain(conn, join, "text[], integer", ["{1,2}", 5])
    assert "Index Scan using items_g1_embedding_idx" in plan and "Order By: (embedding <=> q.embedding)" in plan
    # vectorsync.nearest / nearest_to (v2, migration 0005) run the unfiltered text above, with
    # ef_search raised to k: asking for 10 with ef_search => 1 still gives 10 rows.
    assert conn.execute("SELECT count(*) FROM vectorsync.nearest_to('items', %s, 10, ef_search => 1)",
                        (q,)).fetchone()[0] == 10
    assert conn.execute("SELECT count(*) FROM vectorsync.nearest('items', '0', 10, ef_search => 1)").fetchone()[0] == 10


def test_search_settings_come_from_the_call_or_the_spec(conn, db_url):
    make_embedding(conn, db_url, n=300, index={"ef_search": 55, "probes": 3})

    def settings_after(query: str) -> tuple[str, str]:
        with conn.transaction():
            conn.execute(query).fetchall()
            return conn.execute(
                "SELECT current_setting('hnsw.ef_search'), current_setting('ivfflat.probes')"
            ).fetchone()

    assert settings_after("SELECT * FROM vectorsync.nearest_where('items', '1', 5)") == ("55", "3")
    per_call = "SELECT * FROM vectorsync.nearest_where('items', '1', 5, ef_search => 77, probes => 9)"
    assert settings_after(per_call) == ("77", "9")
    assert settings_after("SELECT * FROM vectorsync.knn_join('items', NULL, 5, ef_search => 66)") == ("66", "3")
    assert settings_after("SELECT * FROM vectorsync.nearest('items', '1', 5, probes => 4)") == ("55", "4")


def test_ivfflat_probes_trade_recall_for_speed(conn, db_url):
    ivfflat = {"kind": "ivfflat", "lists": 30, "probes": 1}
    _, vectors = make_embedding(conn, db_url, n=3000, clusters=3000, index=ivfflat)

    def recall(**call: int) -> float:
        hits = 0
        for i in range(0, 3000, 150):
            expected = set(np.argsort(exact(vectors, vectors[i]))[1:11].astype(str))
            got = conn.execute("SELECT key FROM vectorsync.nearest_where('items', %s, 10, probes => %s)",
                               (str(i), call.get("probes"))).fetchall()
            hits += len(expected & {k for (k,) in got})
        return hits / (20 * 10)

    assert recall(probes=30) == 1.0  # every list: exact
    assert recall() < recall(probes=30)  # the spec's probes = 1


def test_status_view_counts_per_embedding(conn, items):
    conn.execute("UPDATE items SET price = price + 1 WHERE id < 3")
    conn.execute("INSERT INTO items VALUES (5000, 'red', 1)")
    conn.execute("INSERT INTO vectorsync.failed (embedding, key, error, attempts) VALUES ('items', '9', 'bad', 3)")
    row = conn.execute(
        "SELECT name, source_rows, embedded, pending, failed, model_version, lag_seconds > 0 FROM vectorsync.status"
    ).fetchone()
    assert row == ("items", 2001, 2000, 4, 1, 1, True)
    assert conn.execute("SELECT pending FROM vectorsync.embedding_status('items')").fetchone() == (4,)
    assert conn.execute("SELECT count(*) FROM vectorsync.embedding_status('nope')").fetchone() == (0,)


def test_recall_at_10_against_exact_search_at_default_settings(conn, db_url):
    # one cluster per vector: close to gaussian noise, the hard case for an approximate index
    _, vectors = make_embedding(conn, db_url, n=5000, dim=32, seed=1, clusters=5000)
    queries = clustered(100, 32, seed=2, clusters=5000)  # the same distribution, not in the table
    hits = 0
    for q in queries:
        expected = set(np.argsort(exact(vectors, q))[:10].astype(str))
        got = conn.execute("SELECT key FROM vectorsync.nearest_to('items', %s, 10)", (vector_text(q),)).fetchall()
        hits += len(expected & {k for (k,) in got})
    recall = hits / (10 * len(queries))
    print(f"recall@10, HNSW m=16 ef_construction=64 ef_search=40, 5000 x 32 vectors: {recall:.3f}")
    assert recall >= 0.95


# --- index management ----------------------------------------------------------------------------

TABLE_SPEC = """
[[embeddings]]
name = "parts"
table = "parts"
key = "id"
modality = "tabular"
dim = 4
distance = "l2"
columns = ["width", "height", "kind"]
encoder = {{ type = "autoencoder", seed = 1, epochs = 2 }}
index = {{ {index} }}
"""


@pytest.fixture
def parts(conn, write_config):
    conn.execute("CREATE TABLE parts (id integer PRIMARY KEY, width real, height real, kind text)")
    conn.execute("INSERT INTO parts SELECT g, g %% 17, g %% 5, (ARRAY['a','b','c'])[g %% 3 + 1] "
                 "FROM generate_series(1, %s) g", (400,))
    return lambda index="": write_config(TABLE_SPEC.format(index=index))


def indexdef(conn: psycopg.Connection) -> tuple[int, str] | None:
    return conn.execute(
        "SELECT c.oid::int, i.indexdef FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
        "WHERE i.indexname = 'parts_g1_embedding_idx'"
    ).fetchone()


def test_index_parameters_come_from_the_spec(conn, parts, cli):
    assert cli("migrate", config=parts('kind = "hnsw", m = 8, ef_construction = 32')).code == 0
    definition = indexdef(conn)[1]
    assert "USING hnsw (embedding vector_l2_ops)" in definition
    assert "m='8'" in definition and "ef_construction='32'" in definition
    assert cli("migrate", "--recreate", "parts", config=parts('kind = "ivfflat", lists = 7')).code == 0
    definition = indexdef(conn)[1]
    assert "USING ivfflat (embedding)" in definition and "lists='7'" in definition  # l2: the default opclass


def test_large_backfill_builds_the_index_once_after_loading(conn, parts, cli, monkeypatch):
    from vectorsync.sync import bulk, worker

    config = parts()
    assert cli("migrate", config=config).code == 0
    seen: dict[str, object] = {"builds": 0}
    real_drain, real_create = worker.drain, bulk.create_index

    def drain(*args, **kwargs):
        seen["index_while_loading"] = indexdef(conn)
        return real_drain(*args, **kwargs)

    def create_index(*args, **kwargs):
        seen["builds"] += 1
        seen["rows_when_built"] = conn.execute("SELECT count(*) FROM parts_embeddings").fetchone()[0]
        return real_create(*args, **kwargs)

    monkeypatch.setattr(bulk, "BULK_THRESHOLD", 100)
    monkeypatch.setattr(worker, "drain", drain)
    monkeypatch.setattr(bulk, "create_index", create_index)
    result = cli("sync", config=config)
    assert result.code == 0, result.err
    assert seen == {"index_while_loading": None, "builds": 1, "rows_when_built": 400}
    assert "m='16'" in indexdef(conn)[1]


def test_small_sync_keeps_the_index(conn, parts, cli, monkeypatch):
    from vectorsync.sync import bulk

    config = parts()
    assert cli("migrate", config=config).code == 0
    assert cli("sync", config=config).code == 0
    before = indexdef(conn)
    monkeypatch.setattr(bulk, "BULK_THRESHOLD", 100)
    conn.execute("UPDATE parts SET width = width + 1 WHERE id <= 50")
    assert cli("sync", config=config).code == 0
    assert indexdef(conn) == before  # same index (oid): maintained row by row, not rebuilt


def test_reindex_rebuilds_the_index_with_the_spec_parameters(conn, parts, cli):
    assert cli("migrate", config=parts()).code == 0
    assert cli("sync", config=parts()).code == 0
    oid, definition = indexdef(conn)
    assert "m='16'" in definition
    result = cli("reindex", "parts", config=parts("m = 24"))
    assert result.code == 0 and "index rebuilt" in result.err
    new_oid, definition = indexdef(conn)
    assert new_oid != oid and "m='24'" in definition
    assert cli("reindex", "nope", config=parts()).code == 1


# --- SQLAlchemy ----------------------------------------------------------------------------------


def item_model(dim: int = 16, metric: str = "cosine", **options):
    """A fresh user model per test (attach_embedding changes the class)."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        category: Mapped[str | None] = mapped_column(Text)
        price: Mapped[float | None] = mapped_column(REAL)

    attach_embedding(Item, "items", dim=dim, distance=metric, **options)
    return Item


@pytest.fixture
def engine(db_url):
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    yield engine
    engine.dispose()


def test_attach_embedding_adds_a_read_only_relationship(items, engine):
    _, vectors = items
    Item = item_model()
    with Session(engine) as session:
        item = session.get(Item, 12)
        row = item.embedding_row
        assert type(row).__name__ == "ItemEmbedding" and row.model_version == 1
        assert np.allclose(row.embedding, vectors[12])
        joined = session.execute(select(Item).join(Item.embedding_row).where(Item.id < 5)).scalars().all()
        assert sorted(i.id for i in joined) == [0, 1, 2, 3, 4]


def test_similar_to_returns_objects_and_distances_like_the_sql_function(conn, items, engine):
    Item = item_model()
    expected = conn.execute("SELECT key::int, distance FROM vectorsync.nearest('items', '12', 8)").fetchall()
    with Session(engine) as session:
        rows = session.execute(similar_to(session.get(Item, 12), k=8)).all()
    assert all(isinstance(obj, Item) for obj, _ in rows)
    assert [(obj.id, round(d, 6)) for obj, d in rows] == [(k, round(d, 6)) for k, d in expected]


def test_nearest_to_a_vector_with_where(conn, items, engine):
    _, vectors = items
    Item = item_model()
    with Session(engine) as session:
        by_expression = session.execute(nearest(Item, to=vectors[40], k=5, where=Item.category == "red")).all()
        as_list = list(map(float, vectors[40]))
        by_mapping = session.execute(nearest(Item, to=as_list, k=5, where={"category": "red"})).all()
    assert [o.id for o, _ in by_expression] == [o.id for o, _ in by_mapping]
    assert all(o.category == "red" for o, _ in by_expression)
    sql_rows = conn.execute("SELECT key::int FROM vectorsync.nearest_to_where('items', %s, 5, %s)",
                            (vector_text(vectors[40]), '{"category": "red"}')).fetchall()
    assert [o.id for o, _ in by_expression] == [k for (k,) in sql_rows]
    with pytest.raises(ValueError, match="has dimension 16, the query vector has 2"):
        nearest(Item, to=[1.0, 2.0])


def plan(session: Session, stmt) -> str:
    compiled = stmt.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
    return "\n".join(r[0] for r in session.connection().exec_driver_sql(f"EXPLAIN (COSTS OFF) {compiled}"))


def test_orm_queries_use_the_vector_index(items, engine):
    _, vectors = items
    Item = item_model()
    with Session(engine) as session:
        item = session.get(Item, 3)
        for stmt in (similar_to(item, k=5), nearest(Item, to=vectors[3], k=5, where=Item.price > 10)):
            assert "Index Scan using items_g1_embedding_idx" in plan(session, stmt)
        assert "embedding_idx" not in plan(session, nearest(Item, to=vectors[3], k=5, exact=True))


def test_orm_search_settings_reach_the_server(items, engine):
    Item = item_model()
    with Session(engine) as session:
        item = session.get(Item, 3)
        assert len(session.execute(similar_to(item, k=100)).all()) == 100  # ef_search raised to k + 1
        session.execute(similar_to(item, k=5, ef_search=70, probes=6)).all()
        settings = select(func.current_setting("hnsw.ef_search"), func.current_setting("ivfflat.probes"))
        assert session.execute(settings).one() == ("70", "6")
    with Session(engine) as session:  # local to the transaction: a new one starts from the defaults
        assert session.execute(select(func.current_setting("hnsw.ef_search"))).scalar() == "40"


def test_orm_filtered_search_scans_iteratively_and_sorts_exactly(conn, items, engine):
    _, vectors = items
    ones = one_percent(conn, len(vectors))
    iterative = capabilities.detect(conn).has("iterative index scans")
    Item = item_model()
    with Session(engine) as session:
        rows = session.execute(nearest(Item, to=vectors[5], k=10, where={"category": "one"})).all()
        setting = session.execute(select(func.current_setting("hnsw.iterative_scan", True))).scalar()
    assert (setting == "relaxed_order") == iterative
    assert [o.id for o, _ in rows] == list(ones[np.argsort(exact(vectors[ones], vectors[5]))[:10]])
    assert [d for _, d in rows] == sorted(d for _, d in rows)


def test_exact_search_matches_numpy(items, engine):
    _, vectors = items
    Item = item_model()
    with Session(engine) as session:
        rows = session.execute(nearest(Item, to=vectors[99], k=10, exact=True)).all()
    assert [o.id for o, _ in rows] == list(np.argsort(exact(vectors, vectors[99]))[:10])


def test_distance_operator_follows_the_spec(conn, db_url, engine):
    _, vectors = make_embedding(conn, db_url, n=200, dim=8, distance="l2")
    Item = item_model(dim=8, metric="l2")
    with Session(engine) as session:
        rows = session.execute(nearest(Item, to=vectors[0], k=3)).all()
        assert "<->" in str(nearest(Item, to=vectors[0]).compile(engine))
        expression = embedding_distance(Item, vectors[0])
        of_row_0 = select(expression).select_from(Item).join(Item.embedding_row).where(Item.id == 0)
        assert session.execute(of_row_0).scalar() == 0
    assert [o.id for o, _ in rows] == list(np.argsort(exact(vectors, vectors[0], "l2"))[:3])
    column = Item.__vectorsync_embeddings__["items"].embedding
    assert "<#>" in str(distance(column, [1.0] * 8, "inner_product"))
    with pytest.raises(ValueError, match="unknown distance 'manhattan'"):
        distance(column, [1.0] * 8, "manhattan")


def test_object_without_an_embedding_has_no_neighbours(conn, items, engine):
    Item = item_model()
    conn.execute("INSERT INTO items VALUES (9000, 'red', 1)")
    with Session(engine) as session:
        assert session.execute(similar_to(session.get(Item, 9000), k=5)).all() == []


def test_async_session_with_psycopg(db_url, items):
    pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio needs greenlet: pip install 'sqlalchemy[asyncio]'")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    _, vectors = items
    Item = item_model()

    async def run() -> tuple[list, list]:
        engine = create_async_engine(
            "postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(db_url)
        )
        async with AsyncSession(engine) as session:
            item = await session.get(Item, 12)
            similar = (await session.execute(similar_to(item, k=60))).all()
            near = (await session.execute(nearest(Item, to=vectors[12], k=3))).all()
        await engine.dispose()
        return similar, near

    similar, near = asyncio.run(run())
    assert len(similar) == 60 and near[0][0].id == 12 and near[0][1] == pytest.approx(0, abs=1e-6)
    assert [d for _, d in similar] == sorted(d for _, d in similar)


def test_alembic_autogenerate_leaves_a_mapped_target_view_alone(db_url, items, engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from vectorsync.embedding_sql.orm import MANAGED_COMMENT as ORM_COMMENT
    from vectorsync.migrations.autogenerate import include_name, include_object
    from vectorsync.migrations.operations import MANAGED_COMMENT

    assert ORM_COMMENT == MANAGED_COMMENT
    opts = {"include_schemas": True, "include_name": include_name, "include_object": include_object,
            "compare_type": True, "compare_server_default": True}

    def diff(model) -> list:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection, opts=opts), model.metadata)

    # the target is vectorsync's view over its generation in service: neither created nor diffed
    assert diff(item_model()) == []
    assert diff(item_model(dim=17)) == []


# --- hybrid search (keywords + vectors) ----------------------------------------------------------

NOTES = ["the pump housing is cracked", "replace the seal kit SK-2291", "pumps running hot again",
         "gasket for valve V-17", "nothing to report"]


def make_notes(conn: psycopg.Connection, url: str, vectors: np.ndarray, *, language: str = "english"):
    """Text embedding ``notes`` (text_search in ``language``) holding known vectors and texts."""
    conn.execute("CREATE TABLE notes (id integer PRIMARY KEY, body text)")
    conn.cursor().executemany("INSERT INTO notes VALUES (%s, %s)", list(enumerate(NOTES)))
    spec = {"name": "notes", "table": "notes", "key": "id", "modality": "text", "dim": vectors.shape[1],
            "column": "body", "text_search": {"language": language}}
    config = parse_config({"embeddings": [spec]})
    schema.upgrade(url, config)
    emb = catalog.load(conn, config.embeddings[0])
    with conn.transaction():
        sink.upsert(conn, emb, [str(i) for i in range(len(NOTES))], vectors, 1, texts=NOTES)
    conn.execute("DELETE FROM vectorsync.queue")
    return config


def hybrid(conn: psycopg.Connection, text: str, vector: np.ndarray | None, k: int = 10, **weights: float) -> list:
    named = "".join(f", {name} => %({name})s" for name in weights)
    return conn.execute(
        f"SELECT key, score, vector_rank, text_rank FROM vectorsync.hybrid('notes', %(text)s, %(vector)s::vector, "
        f"%(k)s{named})",
        {"text": text, "vector": None if vector is None else vector_text(vector), "k": k, **weights},
    ).fetchall()


def test_hybrid_fuses_keyword_and_vector_ranks_by_reciprocal_rank(conn, db_url):
    vectors = np.eye(5, 8, dtype=np.float32) + 0.01
    make_notes(conn, db_url, vectors)
    got = hybrid(conn, "SK-2291", vectors[0], k=5)
    ranks = {key: (v, t) for key, _, v, t in got}
    assert ranks["1"][1] == 1 and ranks["0"][0] == 1  # the code by keywords, row 0 by its vector
    assert [key for key, *_ in got][:2] in (["0", "1"], ["1", "0"])
    for _, score, v, t in got:
        assert score == pytest.approx((1 / (60 + v) if v else 0) + (1 / (60 + t) if t else 0))
    # english stems: "pump" finds "pump" and "pumps"
    keywords_only = hybrid(conn, "pump", None, vector_weight=0)
    assert sorted(key for key, *_ in keywords_only) == ["0", "2"]
    assert hybrid(conn, "SK-2291", vectors[3], k=1, text_weight=3.0)[0][0] == "1"


def test_hybrid_keywords_follow_changes_and_language(conn, db_url):
    vectors = np.eye(5, 8, dtype=np.float32) + 0.01
    config = make_notes(conn, db_url, vectors, language="simple")
    assert hybrid(conn, "pump", None, vector_weight=0) == [("0", pytest.approx(1 / 61), None, 1)]
    spec = config.embeddings[0].model_copy(update={"text_search": config.embeddings[0].text_search.model_copy(
        update={"language": "english"})})
    schema.upgrade(db_url, config.model_copy(update={"embeddings": [spec]}))  # refills in the new language
    assert sorted(key for key, *_ in hybrid(conn, "pump", None, vector_weight=0)) == ["0", "2"]
    conn.execute("DELETE FROM notes WHERE id = 0")  # the capture trigger drops its row, keywords too
    assert [key for key, *_ in hybrid(conn, "pump", None, vector_weight=0)] == ["2"]


def test_hybrid_refuses_an_embedding_without_keywords_and_bad_weights(conn, items):
    _, vectors = items
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="no keyword search"):
        conn.execute("SELECT * FROM vectorsync.hybrid('items', 'x', %s::vector)", (vector_text(vectors[0]),))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="weights"):
        conn.execute("SELECT * FROM vectorsync.hybrid('items', 'x', %s::vector, 10, 0, 0)", (vector_text(vectors[0]),))


def test_orm_hybrid_returns_objects_and_scores_like_the_sql_function(conn, db_url, engine):
    from vectorsync.embedding_sql import hybrid as orm_hybrid

    vectors = np.eye(5, 8, dtype=np.float32) + 0.01
    make_notes(conn, db_url, vectors)

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str] = mapped_column(Text)

    attach_embedding(Note, "notes", dim=8)
    with Session(engine) as session:
        got = session.execute(orm_hybrid(Note, "valve V-17", vectors[4], k=3)).all()
        only_words = session.execute(orm_hybrid(Note, "pump", None, vector_weight=0)).all()
    expected = hybrid(conn, "valve V-17", vectors[4], k=3)
    assert [(str(note.id), score) for note, score in got] == [(key, pytest.approx(s)) for key, s, *_ in expected]
    assert {note.body for note, _ in only_words} == {NOTES[0], NOTES[2]}


def index_scans(session: Session, stmt) -> int:
    """How many times ``stmt``, as the ORM sends it, scans the embedding's vector index
    (EXPLAIN ANALYZE of the statement and parameters the cursor received, in the same transaction)."""
    sent: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, many):
        sent.append((statement, parameters))

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", record)
    try:
        session.execute(stmt).all()
    finally:
        event.remove(connection, "before_cursor_execute", record)
    statement, parameters = sent[-1]
    cursor = connection.connection.driver_connection.cursor()
    cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
    (plan,) = cursor.fetchone()

    def walk(node: dict) -> int:
        own = node.get("Actual Loops", 0) if "embedding_idx" in node.get("Index Name", "") else 0
        return own + sum(walk(child) for child in node.get("Plans", []))

    return walk(plan[0]["Plan"])


def test_orm_where_follows_the_sql_functions_selective_filter_rule(conn, items, engine):
    """As vectorsync.nearest_to_where: 2000 rows, k = 10, a filter keeping 1 % is answered exactly,
    without touching the index; one keeping a quarter walks the index."""
    _, vectors = items
    ones = one_percent(conn, 2000)
    Item = item_model()
    with Session(engine) as session:
        # on 2000 rows the planner might sort by itself; with sorting priced out it walks the index
        # unless the rule chose the exact branch
        session.execute(text("SET LOCAL enable_sort = off"))
        selective = nearest(Item, to=vectors[5], k=10, where={"category": "one"})
        rows = session.execute(selective).all()
        assert index_scans(session, selective) == 0
        broad = nearest(Item, to=vectors[5], k=10, where={"category": "blue"})
        assert len(session.execute(broad).all()) == 10
        assert index_scans(session, broad) >= 1
        item = session.get(Item, 7)
        assert index_scans(session, similar_to(item, k=10, where={"category": "one"})) == 0
    assert [o.id for o, _ in rows] == list(ones[np.argsort(exact(vectors[ones], vectors[5]))[:10]])
    assert [d for _, d in rows] == sorted(d for _, d in rows)
