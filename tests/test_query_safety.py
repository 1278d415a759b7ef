"""Query functions are safe for any input: large and bad k, NULL vectors, filters in the column's own
type, and catalogue values that never run as SQL."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.test_embedding_sql import exact, item_model, make_embedding, vector_text
from vectorsync.embedding_sql import nearest
from vectorsync.sync import catalog
from vectorsync.sync.spec import parse_config

K = 10_000


@pytest.fixture
def many(conn, db_url):
    """10,500 rows: more than k = 10,000 and far more than the largest ef_search, 1000."""
    return make_embedding(conn, db_url, n=10_500, dim=4)


def test_k_of_ten_thousand_returns_the_exact_nearest_rows(conn, many):
    _, vectors = many
    expected = np.sort(exact(vectors, vectors[3]))
    for query, args in (
        ("SELECT key, distance FROM vectorsync.nearest('items', '3', %s)", (K,)),
        ("SELECT key, distance FROM vectorsync.nearest_to('items', %s, %s)", (vector_text(vectors[3]), K)),
    ):
        got = conn.execute(query, args).fetchall()
        assert len(got) == K and len({key for key, _ in got}) == K
        distances = np.array([d for _, d in got])
        assert np.all(np.diff(distances) >= 0)
        skip = 1 if "nearest(" in query else 0  # nearest leaves the row itself out (distance 0)
        np.testing.assert_allclose(distances, expected[skip : K + skip], atol=1e-5)
    blue = conn.execute(
        "SELECT count(*) FROM vectorsync.nearest_where('items', '3', %s, %s)", (K, json.dumps({"category": "blue"}))
    ).fetchone()[0]
    assert blue == conn.execute("SELECT count(*) FROM items WHERE category = 'blue' AND id <> 3").fetchone()[0]
    joined = conn.execute("SELECT count(*), max(rank) FROM vectorsync.knn_join('items', ARRAY['3'], %s)", (K,))
    assert joined.fetchone() == (K, K)


def test_an_ef_search_above_pgvectors_limit_is_capped_not_an_error(conn, many):
    assert (
        conn.execute("SELECT count(*) FROM vectorsync.nearest('items', '3', 1500, ef_search => 5000)").fetchone()[0]
        == 1500
    )
    assert conn.execute("SELECT count(*) FROM vectorsync.nearest('items', '3', 999)").fetchone()[0] == 999


@pytest.mark.parametrize("k", [0, -1, None])
def test_k_below_one_is_a_one_line_error(conn, db_url, k):
    make_embedding(conn, db_url, n=50, dim=4)
    for query in (
        "SELECT * FROM vectorsync.nearest('items', '3', %s)",
        "SELECT * FROM vectorsync.nearest_to('items', '[1,2,3,4]', %s)",
        "SELECT * FROM vectorsync.nearest_where('items', '3', %s, '{\"category\": \"red\"}')",
        "SELECT * FROM vectorsync.knn_join('items', NULL, %s)",
    ):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as error:
            conn.execute(query, (k,))
        assert str(
            error.value.diag.message_primary
        ) == f"vectorsync: k must be a positive number of rows, got {k}".replace("None", "NULL")


def test_a_null_query_vector_is_an_error_not_null_distances(conn, db_url):
    make_embedding(conn, db_url, n=50, dim=4)
    for query in (
        "SELECT * FROM vectorsync.nearest_to('items', NULL, 5)",
        "SELECT * FROM vectorsync.nearest_to_where('items', NULL, 5, '{\"category\": \"red\"}')",
    ):
        with pytest.raises(psycopg.errors.NullValueNotAllowed, match="query vector for embedding items is NULL"):
            conn.execute(query)


def test_filters_compare_in_the_columns_type_without_truncating_the_value(conn, db_url):
    make_embedding(conn, db_url, n=200, dim=4)
    conn.execute("ALTER TABLE items ADD COLUMN code varchar(3), ADD COLUMN cost numeric(5, 2)")
    conn.execute("UPDATE items SET code = left(category, 3), cost = 1.23")
    red = conn.execute("SELECT count(*) FROM items WHERE code = 'red' AND id <> 1").fetchone()[0]

    def matches(value: dict) -> int:
        query = "SELECT count(*) FROM vectorsync.nearest_where('items', '1', 500, %s)"
        return conn.execute(query, (json.dumps(value),)).fetchone()[0]

    assert matches({"code": "red"}) == red
    assert matches({"code": "redX"}) == 0  # a cast to varchar(3) would make it 'red'
    assert matches({"cost": 1.23}) == 199
    assert matches({"cost": 1.234}) == 0  # a cast to numeric(5, 2) would round it to 1.23


def test_key_type_written_into_the_catalogue_never_runs_as_sql(conn, db_url):
    """A role allowed to UPDATE only key_type cannot run its text inside another role's queries."""
    make_embedding(conn, db_url, n=50, dim=4)
    payload = "integer) + length(set_config('vs.pwned', current_user, false)) * 0 + (0"
    conn.execute("UPDATE vectorsync.embeddings SET key_type = %s", (payload,))
    for query in (
        "SELECT * FROM vectorsync.nearest('items', '3', 5)",
        "SELECT * FROM vectorsync.nearest_to('items', '[1,2,3,4]', 5)",
        "SELECT * FROM vectorsync.knn_join('items', ARRAY['3'], 5)",
    ):
        with pytest.raises(psycopg.errors.DataException, match="is not a type name"):
            conn.execute(query)
    assert conn.execute("SELECT current_setting('vs.pwned', true)").fetchone()[0] in (None, "")
    spec = parse_config(
        {
            "embeddings": [
                {"name": "items", "table": "items", "key": "id", "modality": "tabular", "dim": 4, "columns": ["price"]}
            ]
        }
    ).embeddings[0]
    with pytest.raises(catalog.CatalogError, match="is not a type name"):
        catalog.load(conn, spec)


def test_cli_search_answers_a_bad_k_in_one_line_and_a_large_k_in_full(conn, db_url, write_config, cli):
    make_embedding(conn, db_url, n=1200, dim=4)
    config = write_config("")
    for k in ("0", "-3"):
        result = cli("search", "items", "3", "-k", k, "--json", config=config)
        assert result.code == 1
        assert result.err.strip() == f"error: k must be a positive number of rows, got {k}"
    result = cli("search", "items", "3", "-k", "1100", "--json", config=config)
    assert result.code == 0 and len(json.loads(result.out)) == 1100


def test_orm_nearest_with_k_above_the_largest_ef_search_returns_the_exact_nearest_rows(conn, db_url, many):
    _, vectors = many
    Item = item_model(dim=4)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    with Session(engine) as session:
        rows = session.execute(nearest(Item, to=vectors[5], k=2000)).all()
        assert [o.id for o, _ in rows] == list(np.argsort(exact(vectors, vectors[5]), kind="stable")[:2000])
        assert len(session.execute(nearest(Item, to=vectors[5], k=900, ef_search=5000)).all()) == 900
    engine.dispose()
