"""A new user's first hour (issue 16): truthful commands and one-line errors."""

from __future__ import annotations

import pytest

PRODUCTS = """
[[embeddings]]
name = "products"
table = "products"
key = "id"
modality = "tabular"
dim = 2
columns = ["price", "weight"]
encoder = { epochs = 5 }
"""


@pytest.fixture
def products(conn, write_config, cli):
    conn.execute("CREATE TABLE products (id integer PRIMARY KEY, price real, weight real)")
    conn.execute("INSERT INTO products SELECT i, i * 1.5, (i % 7) + 0.5 FROM generate_series(1, 60) AS i")
    config = write_config(PRODUCTS)
    assert cli("migrate", config=config).code == 0
    return config


def test_search_tells_a_missing_row_from_one_not_embedded_yet(products, cli):
    missing = cli("search", "products", "99999", config=products)
    assert missing.code == 1
    assert "no row with id = 99999" in missing.err and "no embedding yet" not in missing.err
    assert "vectorsync sync" not in missing.err
    pending = cli("search", "products", "1", config=products)
    assert pending.code == 1
    assert "row 1 of embedding products has no embedding yet" in pending.err
    assert "hint: run vectorsync sync products" in pending.err
