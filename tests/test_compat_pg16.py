"""The compatibility set: migrate, sync, every query function and the ORM against the previous
embedded default, PostgreSQL 16.2 + pgvector 0.6.2 (``pgserver`` 0.1.4), in the same run as the
rest of the suite (which runs on PostgreSQL 18 + pgvector 0.8).

The tests are those of ``test_embedding_sql``, collected again here with the old server behind
the ``pg_server`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg_support import embedded_server
from tests.test_embedding_sql import *  # noqa: F403  (collected again, against the old server)
from tests.worker_support import scalar
from vectorsync.errors import DatabaseError
from vectorsync.sync import schema
from vectorsync.sync.spec import parse_config


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    pytest.importorskip("pgserver")
    with embedded_server(old=True) as server:
        yield server.get_uri()


def test_a_server_without_halfvec_refuses_it_in_one_line(conn, db_url):
    conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, price real)")
    for storage in ("halfvec", "bit"):
        config = parse_config({"embeddings": [{
            "name": "docs", "table": "docs", "key": "id", "modality": "tabular", "dim": 8,
            "storage": storage, "columns": ["price"],
        }]})
        with pytest.raises(DatabaseError) as refused:
            schema.upgrade(db_url, config)
        assert str(refused.value) == (
            f"embedding 'docs': storage = {storage} needs pgvector >= 0.7; this server has 0.6.2"
        )
    assert scalar(conn, "SELECT to_regclass('vectorsync.generations')") is None  # nothing was made
