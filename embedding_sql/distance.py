"""The distance vocabulary, in one place: each distance a spec may name, with pgvector's SQL
operator, the index operator class that serves it and the ``pgvector.sqlalchemy`` comparator.

The SQL functions installed by the migrations carry their own copy of the operators (a released
revision never changes); everything written in Python reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

Distance = Literal["cosine", "l2", "inner_product"]


@dataclass(frozen=True)
class DistanceOps:
    operator: str
    opclass: str
    comparator: str


DISTANCES: dict[str, DistanceOps] = {
    "cosine": DistanceOps("<=>", "vector_cosine_ops", "cosine_distance"),
    "l2": DistanceOps("<->", "vector_l2_ops", "l2_distance"),
    # pgvector's <#> is the negative inner product, so that smaller is nearer as for the others
    "inner_product": DistanceOps("<#>", "vector_ip_ops", "max_inner_product"),
}


def distance_ops(metric: str) -> DistanceOps:
    """The operator, opclass and comparator of the distance named ``metric``."""
    try:
        return DISTANCES[metric]
    except KeyError:
        raise ValueError(f"unknown distance {metric!r}; use one of {', '.join(DISTANCES)}") from None


def distance(column: Any, query: Any, metric: str) -> ColumnElement[float]:
    """``column <op> query`` for the distance named ``metric`` ("cosine", "l2" or "inner_product")."""
    result: ColumnElement[float] = getattr(column, distance_ops(metric).comparator)(query)
    return result
