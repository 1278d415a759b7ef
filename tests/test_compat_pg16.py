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


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    pytest.importorskip("pgserver")
    with embedded_server(old=True) as server:
        yield server.get_uri()
