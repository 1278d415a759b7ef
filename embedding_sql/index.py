"""The vector index of a target table: its kinds and their defaults, read by the spec, the migration
operations and the query helpers (nowhere else sets them)."""

from __future__ import annotations

from typing import Literal

IndexKind = Literal["hnsw", "ivfflat", "none"]

INDEX_KIND: IndexKind = "hnsw"
#: HNSW: links per node, and the candidate list size while building.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
#: HNSW: the candidate list size while searching (pgvector's own default too); a scan returns at most this many rows.
HNSW_EF_SEARCH = 40
#: IVFFlat: lists probed per query.
IVFFLAT_PROBES = 10


def ivfflat_lists(rows: int) -> int:
    """pgvector's advice for up to a million rows: rows / 1000 lists, and at least 10."""
    return max(10, rows // 1000)

