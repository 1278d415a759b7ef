"""Settings for building a vector index as a careful DBA would: ``maintenance_work_mem`` sized so
the HNSW graph stays in memory (a build that spills is several times slower) and a parallel
maintenance worker per core beside the leader (pgvector >= 0.6 builds in parallel). Used by the
backfill's build (``bulk``) and by a new generation's concurrent build (``generations``)."""

from __future__ import annotations

import psycopg

from vectorsync.embedding_sql.storage import element_bytes
from vectorsync.encoders.base import usable_cores
from vectorsync.migrations.operations import EmbeddingObjects
from vectorsync.sync.db import scalar

#: The most maintenance_work_mem an index build asks for (vectorsync cannot see the server's RAM).
INDEX_BUILD_MEMORY_CAP = 2 << 30


def build_memory(rows: int, dim: int, m: int, storage: str = "vector") -> int:
    """Bytes for an HNSW graph of ``rows`` vectors to stay in memory while it is built: each
    element keeps its vector as the index stores it and 2m neighbour candidates on layer 0 (16
    bytes each in pgvector's build), plus about 200 bytes for the element, its upper layers and
    allocation headers (measured: pgvector 0.8 fills 790 bytes per element at dim 16, m 16, where
    this gives 784); with a quarter to spare."""
    per_element = element_bytes(storage, dim) + 2 * m * 16 + 200
    return int(rows * per_element * 1.25)


def build_settings(conn: psycopg.Connection, e: EmbeddingObjects, rows: int) -> dict[str, str]:
    """``maintenance_work_mem`` (never lowered, at most ``INDEX_BUILD_MEMORY_CAP``) and
    ``max_parallel_maintenance_workers`` for building ``e``'s index over ``rows`` rows."""
    current = int(scalar(conn, "SELECT pg_size_bytes(current_setting('maintenance_work_mem'))"))
    parallel = int(scalar(conn, "SELECT current_setting('max_parallel_workers')::int"))
    memory = min(max(build_memory(rows, e.dim, e.m, e.storage), current), INDEX_BUILD_MEMORY_CAP)
    # the server's cores are not visible over SQL; this machine's stand in for them (the embedded
    # default runs here), minus one for the leader process that builds too
    workers = max(1, min(parallel, usable_cores() - 1))
    return {"maintenance_work_mem": f"{memory // 1024}kB", "max_parallel_maintenance_workers": str(workers)}
