"""SQL and ORM access to the vectors: SQL functions (installed by the migrations) and the
SQLAlchemy / psycopg integration. Knows nothing of workers.

    from vectorsync.embedding_sql import Vector, attach_embedding, nearest, similar_to

    attach_embedding(Item, "items", dim=16)              # Item.embedding_row, read-only
    session.execute(similar_to(item, k=5)).all()         # [(Item, distance), ...]
    session.execute(nearest(Item, to=vector, k=10, where=Item.in_stock)).all()
    session.execute(hybrid(Note, "seal kit SK-2291", vector, k=10)).all()   # [(Note, score), ...]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vectorsync.embedding_sql.distance import DISTANCES, Distance, distance

if TYPE_CHECKING:
    from pgvector.sqlalchemy import Vector

    from vectorsync.embedding_sql.orm import EmbeddingInfo, attach_embedding, embedding_info
    from vectorsync.embedding_sql.query import embedding_distance, hybrid, nearest, search_settings, similar_to

#: The ORM names load SQLAlchemy on first use: a worker, which imports the distance vocabulary and
#: the index defaults from this package, never pays for it.
_LAZY = {
    "Vector": "pgvector.sqlalchemy",
    "EmbeddingInfo": "vectorsync.embedding_sql.orm",
    "attach_embedding": "vectorsync.embedding_sql.orm",
    "embedding_info": "vectorsync.embedding_sql.orm",
    "embedding_distance": "vectorsync.embedding_sql.query",
    "hybrid": "vectorsync.embedding_sql.query",
    "nearest": "vectorsync.embedding_sql.query",
    "search_settings": "vectorsync.embedding_sql.query",
    "similar_to": "vectorsync.embedding_sql.query",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DISTANCES",
    "Distance",
    "EmbeddingInfo",
    "Vector",
    "attach_embedding",
    "distance",
    "embedding_distance",
    "embedding_info",
    "hybrid",
    "nearest",
    "search_settings",
    "similar_to",
]
