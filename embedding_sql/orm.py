"""Attach a vectorsync embedding to a user's mapped class.

``attach_embedding(Item, "items", dim=16)`` maps the embedding's target table (written by
vectorsync's workers) to a read-only class and adds a one-to-one relationship, so
``item.embedding_row.embedding`` is the row's vector. The mapping matches the table vectorsync
creates, so Alembic autogenerate in the user's project compares it clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pgvector.sqlalchemy import HALFVEC, Vector
from sqlalchemy import Column, Integer, Table, Text, func, inspect
from sqlalchemy.orm import Mapper, foreign, relationship
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TIMESTAMP

from vectorsync.embedding_sql.distance import distance, distance_ops
from vectorsync.embedding_sql.storage import STORAGES

#: The comment vectorsync puts on target tables; the same text as migrations.operations.MANAGED_COMMENT.
MANAGED_COMMENT = "vectorsync: embeddings of"


@dataclass(frozen=True)
class EmbeddingInfo:
    """What the query helpers need to know about one embedding attached to a mapped class."""

    name: str
    model: type
    table: Table
    row_class: type
    model_key: Any  # the mapped class's key attribute (InstrumentedAttribute)
    dim: int
    distance: str
    ef_search: int | None
    probes: int | None
    storage: str = "vector"

    @property
    def key(self) -> Column[Any]:
        return self.table.c[self.model_key.property.columns[0].name]

    @property
    def embedding(self) -> Column[Any]:
        return self.table.c.embedding

    def distance_to(self, query: Any) -> ColumnElement[float]:
        """The spec's distance between this embedding and ``query`` (a vector or an expression)."""
        return distance(self.embedding, query, self.distance)


def attach_embedding(
    model: type,
    name: str,
    *,
    dim: int,
    distance: str = "cosine",
    target: str | None = None,
    schema: str | None = None,
    relationship_name: str = "embedding_row",
    ef_search: int | None = None,
    probes: int | None = None,
    storage: str = "vector",
) -> type:
    """Map embedding ``name``'s target table and add ``model.<relationship_name>`` (one-to-one,
    read-only). ``target`` defaults to vectorsync's ``<name>_embeddings``, ``schema`` to the
    model's; ``storage`` is the spec's (a ``halfvec`` embedding reads as ``HALFVEC``). Returns the
    class mapped to the target table (``<Model>Embedding``)."""
    try:
        distance_ops(distance)
    except ValueError as exc:
        raise ValueError(f"embedding {name!r}: {exc}") from None
    if storage not in STORAGES:
        raise ValueError(f"embedding {name!r}: unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
    mapper: Mapper[Any] = inspect(model)
    if len(mapper.primary_key) != 1:
        raise ValueError(
            f"embedding {name!r}: {model.__name__} has a {len(mapper.primary_key)}-column primary key; "
            "vectorsync keys embeddings by one column"
        )
    key_column = mapper.primary_key[0]
    model_key = mapper.get_property_by_column(key_column).class_attribute
    source = mapper.local_table
    if not isinstance(source, Table):
        raise ValueError(f"{model.__name__} is not mapped to a table; attach_embedding needs one")
    table = Table(
        target or f"{name}_embeddings",
        source.metadata,
        Column(key_column.name, key_column.type, primary_key=True),
        Column("embedding", HALFVEC(dim) if storage == "halfvec" else Vector(dim), nullable=False),
        Column("model_version", Integer, nullable=False),
        Column("input_hash", Text),
        Column("embedded_at", TIMESTAMP(timezone=True), nullable=False, server_default=func.now()),
        schema=schema if schema is not None else mapper.local_table.schema,
        comment=f"{MANAGED_COMMENT} {name}",
        info={"vectorsync": name},
    )
    row_class = type(f"{model.__name__}Embedding", (), {"__doc__": f"A row of embedding {name!r} (read-only)."})
    mapper.registry.map_imperatively(row_class, table)
    mapper.add_property(
        relationship_name,
        relationship(
            row_class,
            primaryjoin=model_key == foreign(table.c[key_column.name]),
            uselist=False,
            viewonly=True,
        ),
    )
    info = EmbeddingInfo(name, model, table, row_class, model_key, dim, distance, ef_search, probes, storage)
    embeddings = dict(getattr(model, "__vectorsync_embeddings__", {}))
    embeddings[name] = info
    model.__vectorsync_embeddings__ = embeddings  # type: ignore[attr-defined]  # a class attribute we add
    return row_class


def embedding_info(model: type, name: str | None = None) -> EmbeddingInfo:
    """The embedding attached to ``model`` (by name when it has several)."""
    embeddings: dict[str, EmbeddingInfo] = getattr(model, "__vectorsync_embeddings__", {})
    if name is not None and name in embeddings:
        return embeddings[name]
    if name is None and len(embeddings) == 1:
        return next(iter(embeddings.values()))
    if not embeddings:
        raise ValueError(f"{model.__name__} has no embedding; call attach_embedding({model.__name__}, ...) first")
    raise ValueError(
        f"{model.__name__} has embeddings {', '.join(sorted(embeddings))}; pass embedding=NAME"
        + (f" (not {name!r})" if name else "")
    )
