"""SQL and ORM access to the vectors: SQL functions (installed by the migrations) and the
SQLAlchemy / psycopg integration. Knows nothing of workers.

    from vectorsync.embedding_sql import Vector, attach_embedding, nearest, similar_to

    attach_embedding(Item, "items", dim=16)              # Item.embedding_row, read-only
    session.execute(similar_to(item, k=5)).all()         # [(Item, distance), ...]
    session.execute(nearest(Item, to=vector, k=10, where=Item.in_stock)).all()
    session.execute(hybrid(Note, "seal kit SK-2291", vector, k=10)).all()   # [(Note, score), ...]
"""

from pgvector.sqlalchemy import Vector

from vectorsync.embedding_sql.distance import DISTANCES, Distance, distance
from vectorsync.embedding_sql.orm import EmbeddingInfo, attach_embedding, embedding_info
from vectorsync.embedding_sql.query import embedding_distance, hybrid, nearest, search_settings, similar_to

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
