"""How a generation stores and indexes its vectors (``storage`` in the spec), in one place: the
column type, the type the target view shows, and what the vector index covers.

- ``vector``: single precision, indexed as stored.
- ``halfvec``: half precision, stored and indexed (pgvector >= 0.7; up to 4,000 dimensions in an
  index): half the table and index size.
- ``bit``: the full vector is stored; the index covers its binary quantization
  (``binary_quantize(embedding)::bit(dim)``, Hamming distance). A search takes ``RERANK`` times k
  candidates from that index and orders them by the full-precision distance.

The SQL functions installed by the migrations carry their own copy of these rules (a released
revision never changes); everything written in Python reads them from here.
"""

from __future__ import annotations

from typing import Literal

from psycopg import sql

from vectorsync.embedding_sql.distance import distance_ops

Storage = Literal["vector", "halfvec", "bit"]

STORAGES: tuple[Storage, ...] = ("vector", "halfvec", "bit")
#: The most dimensions pgvector indexes in half precision.
HALFVEC_MAX_DIM = 4000
#: With ``bit``: candidates taken from the binary index per row asked for, then re-ranked exactly.
RERANK = 10


def column_type(storage: str, dim: int) -> sql.Composed:
    """The generation table's column type: ``halfvec(dim)`` for halfvec, else ``vector(dim)``."""
    return sql.SQL("{}({})").format(sql.SQL("halfvec" if storage == "halfvec" else "vector"), sql.Literal(dim))


def element_bytes(storage: str, dim: int) -> int:
    """Bytes one stored element of an index over ``storage`` takes for its vector."""
    return {"halfvec": 2 * dim, "bit": (dim + 7) // 8}.get(storage, 4 * dim) + 8


def view_type(storage: str) -> str:
    """The type the target view gives the column (no dimension, so generations of another dim can
    replace each other): ``halfvec`` for halfvec, else ``vector`` (bit keeps the full vector)."""
    return "halfvec" if storage == "halfvec" else "vector"


def quantized(column: sql.Composable, dim: int) -> sql.Composed:
    """``binary_quantize(<column>::vector)::bit(dim)``: the expression a ``bit`` index covers. The
    cast is the one the target view applies, so a query through the view matches the index too."""
    return sql.SQL("(binary_quantize({}::vector)::bit({}))").format(column, sql.Literal(dim))


def indexed(storage: str, distance: str, dim: int) -> sql.Composed:
    """What a generation's vector index covers, with its operator class: ``embedding <opclass>``."""
    if storage == "bit":
        return sql.SQL("{} bit_hamming_ops").format(quantized(sql.Identifier("embedding"), dim))
    opclass = distance_ops(distance).opclass
    if storage == "halfvec":
        opclass = opclass.replace("vector_", "halfvec_", 1)
    return sql.SQL("embedding {}").format(sql.SQL(opclass))
