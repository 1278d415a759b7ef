"""Distance expressions by name: the spec's ``distance`` picks pgvector's comparator."""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql.elements import ColumnElement

#: The spec's distance -> pgvector.sqlalchemy comparator (and SQL operator) that the index serves.
COMPARATORS: dict[str, str] = {
    "cosine": "cosine_distance",  # <=>
    "l2": "l2_distance",  # <->
    "inner_product": "max_inner_product",  # <#>, the negative inner product
}


def distance(column: Any, query: Any, metric: str) -> ColumnElement[float]:
    """``column <op> query`` for the distance named ``metric`` ("cosine", "l2" or "inner_product")."""
    try:
        comparator = COMPARATORS[metric]
    except KeyError:
        raise ValueError(f"unknown distance {metric!r}; use one of {', '.join(COMPARATORS)}") from None
    return getattr(column, comparator)(query)
