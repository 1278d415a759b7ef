"""Filters for Alembic autogenerate in a user's own project.

vectorsync's internal schema and its target tables are managed by ``vectorsync migrate``; a user's
autogenerate must neither drop them nor diff them. In the user's ``env.py``::

    import pgvector.sqlalchemy  # registers the vector type for reflection
    from vectorsync.migrations.autogenerate import include_name, include_object

    context.configure(..., include_name=include_name, include_object=include_object)
"""

from __future__ import annotations

from typing import Any

import pgvector.sqlalchemy  # noqa: F401  (registers "vector" with SQLAlchemy's PostgreSQL reflection)

from vectorsync.migrations.operations import MANAGED_COMMENT

INTERNAL_SCHEMA = "vectorsync"


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Skip the internal ``vectorsync`` schema entirely (for ``include_schemas=True``)."""
    return not (type_ == "schema" and name == INTERNAL_SCHEMA)


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Skip the tables vectorsync manages (and their columns and indexes): reflected generation
    tables, and a mapped target (``embedding_sql.attach_embedding``), which is vectorsync's view."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    if table is None:
        return True
    if reflected and getattr(table, "schema", None) == INTERNAL_SCHEMA:
        return False
    return not (getattr(table, "comment", None) or "").startswith(MANAGED_COMMENT)
