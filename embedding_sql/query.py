"""Query builders: ``nearest(Model, to=..., k=10, where=...)`` and ``similar_to(obj, k=10)``.

Both return a ``Select`` of ``(obj, distance)`` rows, ordered by the spec's distance operator so the
HNSW / IVFFlat index serves them, for ``session.execute(...)`` or ``await session.execute(...)``::

    for item, distance in session.execute(similar_to(item, k=5)):
        ...

When ``hnsw.ef_search`` / ``ivfflat.probes`` must change (``k`` above ef_search, or an explicit
value), the statement carries them as an execution option and a cursor hook sets them with
``set_config(..., is_local => true)`` just before it runs, in the same transaction.

A filtered search (``where``) turns on pgvector's iterative index scans (``relaxed_order``, at
most ``hnsw.max_scan_tuples`` = 20,000 tuples) where the server has pgvector >= 0.8, so the index
keeps yielding candidates until k rows match; the rows are sorted again by exact distance. The hook
checks the server's pgvector version, so the same statement runs on older servers, where a very
selective filter may return fewer than k rows (``exact=True`` compares every row). A ``where``
mapping is also the SQL functions' filter: the statement holds an exact and an index branch, and
``vectorsync._selective`` (the planner's estimate against 2 * sqrt(k * rows)) picks one when it runs.

An embedding stored as ``bit`` (``attach_embedding(..., storage="bit")``) is searched as the SQL
functions search it: ``RERANK`` times k candidates by the Hamming distance of the binary quantization
(its index), then the k nearest of them by the full-precision distance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pgvector.sqlalchemy import HALFVEC, Vector
from sqlalchemy import Engine, Float, Text, cast, column, event, func, inspect, literal, null, select, union_all
from sqlalchemy.dialects.postgresql import BIT, JSONB
from sqlalchemy.orm import ColumnProperty, Mapper, aliased
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from vectorsync.embedding_sql.index import HNSW_EF_SEARCH
from vectorsync.embedding_sql.orm import EmbeddingInfo, embedding_info
from vectorsync.embedding_sql.storage import RERANK

#: The largest hnsw.ef_search pgvector accepts: a search for more rows compares every row instead.
MAX_EF_SEARCH = 1000
#: The execution option that carries the search settings to the cursor hook.
SETTINGS_OPTION = "vectorsync_search_settings"
#: Settings of a filtered search, applied only where the server's pgvector has them (>= 0.8): an
#: older pgvector reserves the prefix and refuses settings it does not know.
ITERATIVE_SCAN = (
    ("hnsw.iterative_scan", "relaxed_order"),
    ("hnsw.max_scan_tuples", "20000"),
    ("ivfflat.iterative_scan", "relaxed_order"),
)


def nearest(
    model: type,
    to: Any,
    k: int = 10,
    where: Any = None,
    *,
    embedding: str | None = None,
    ef_search: int | None = None,
    probes: int | None = None,
    exact: bool = False,
) -> Select[Any, float]:
    """The ``k`` rows of ``model`` nearest to ``to``: an instance of ``model`` (itself left out), a
    vector (list, numpy array, pgvector Vector) or a SQL expression such as
    ``bindparam("query", type_=Vector(dim))`` (build the statement once, execute it with
    ``session.execute(stmt, {"query": vector})``). ``where`` is a SQL expression, a sequence of them,
    or a ``{attribute: value}`` mapping, applied to ``model``'s rows. ``exact`` compares every row
    instead of using the index (for recall checks or very selective filters); so does a ``k`` above
    what an HNSW scan can return (``MAX_EF_SEARCH``)."""
    info = embedding_info(model, embedding)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    exclude = None
    exact = exact or k + isinstance(to, model) > MAX_EF_SEARCH
    if isinstance(to, model):
        exclude = getattr(to, info.model_key.key)
        query: Any = select(info.embedding).where(info.key == exclude).scalar_subquery()
    else:
        query = _vector(to, info)
    measured = info.distance_to(query)
    stmt: Select[Any, float] = select(model, measured.label("distance")).join(info.table, info.model_key == info.key)
    if exclude is not None:
        # without a vector for ``to`` the distances are NULL: no neighbours rather than arbitrary rows
        stmt = stmt.where(info.key != exclude, query.is_not(None))
    conditions = _conditions(model, where)
    stmt = stmt.where(*conditions)
    candidates = k + (exclude is not None)
    filter_json = _filter(model, where) if isinstance(where, Mapping) and where and not exact else None
    if filter_json is not None:
        # The SQL functions' rule, decided by the same function: the exact answer for a filter the
        # planner expects to keep at most 2 * sqrt(k * rows) rows, the index for the others. A
        # scalar subquery, so the server decides once per statement and runs only one branch.
        selective = select(
            func.vectorsync._selective(func.vectorsync._embedding(info.name), filter_json, candidates)
        ).scalar_subquery()
        branches = union_all(
            _ordered(stmt.where(selective), info, query, measured, k, exact=True, filtered=True).subquery().select(),
            _ordered(stmt.where(~selective), info, query, measured, k, exact=False, filtered=True).subquery().select(),
        ).subquery()
        stmt = select(aliased(model, branches), branches.c.distance).order_by(branches.c.distance + 0).limit(k)
    else:
        stmt = _ordered(stmt, info, query, measured, k, exact=exact, filtered=bool(conditions))
    settings = search_settings(info, candidates * _rerank(info, exact), ef_search=ef_search, probes=probes)
    if conditions and not exact:
        settings += ITERATIVE_SCAN
    return stmt.execution_options(**{SETTINGS_OPTION: settings}) if settings else stmt


def _rerank(info: EmbeddingInfo, exact: bool) -> int:
    """Candidates per result row: those of a ``bit`` index are re-ranked by full-precision distance."""
    return RERANK if info.storage == "bit" and not exact else 1


def _ordered(
    stmt: Select[Any, float],
    info: EmbeddingInfo,
    query: Any,
    measured: ColumnElement[float],
    k: int,
    *,
    exact: bool,
    filtered: bool,
) -> Select[Any, float]:
    """``stmt`` limited to its k nearest rows: every row compared (``exact``), or the index's
    candidates sorted by exact distance where the index's order is not exact."""
    if exact:
        # ``+ 0`` hides the operator from the planner, so no index scan cuts the candidates short
        return stmt.order_by(measured + 0).limit(k)
    rerank = _rerank(info, exact)
    if rerank > 1:
        hamming = _quantized(info.embedding, info.dim).op("<~>", return_type=Float)(_quantized(query, info.dim))
        stmt = stmt.order_by(hamming).limit(k * rerank)
    else:
        stmt = stmt.order_by(measured.label("distance")).limit(k)
    if rerank > 1 or filtered:
        # candidates of a bit index, or of an iterative scan (relaxed order): sort them by exact
        # distance (+ 0, or the planner takes the scan's claimed order for sorted and skips the sort)
        found = stmt.subquery()
        stmt = select(aliased(info.model, found), found.c.distance).order_by(found.c.distance + 0).limit(k)
    return stmt


def similar_to(
    obj: Any,
    k: int = 10,
    where: Any = None,
    *,
    embedding: str | None = None,
    ef_search: int | None = None,
    probes: int | None = None,
    exact: bool = False,
) -> Select[Any, float]:
    """The ``k`` rows nearest to ``obj`` (itself left out); empty while ``obj`` has no embedding."""
    return nearest(
        type(obj), obj, k, where, embedding=embedding, ef_search=ef_search, probes=probes, exact=exact
    )


def hybrid(
    model: type,
    text: str,
    to: Any,
    k: int = 10,
    *,
    embedding: str | None = None,
    vector_weight: float = 1.0,
    text_weight: float = 1.0,
    rrf_k: int = 60,
    candidates: int | None = None,
) -> Select[Any, float]:
    """The ``k`` rows of ``model`` that best match ``text`` by keywords and ``to`` (the query's
    vector, made by the embedding's own model; None with ``vector_weight=0``) by distance, fused
    by ``vectorsync.hybrid``'s weighted reciprocal rank fusion: a ``Select`` of ``(obj, score)``,
    best first. The embedding needs ``text_search`` in its spec."""
    info = embedding_info(model, embedding)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    query = null() if to is None else _vector(to, info)
    found = (
        func.vectorsync.hybrid(info.name, text, query, k, vector_weight, text_weight, rrf_k, candidates)
        .table_valued(column("key", Text), column("score", Float))
    )
    key = cast(found.c.key, info.model_key.type)
    return select(model, found.c.score).join(found, info.model_key == key).order_by(found.c.score.desc(), key)


def embedding_distance(model: type, to: Any, *, embedding: str | None = None) -> ColumnElement[float]:
    """The spec's distance from ``model``'s embedding to ``to`` (a vector or an instance), for your
    own queries: ``select(Item).join(Item.embedding_row).order_by(embedding_distance(Item, v))``."""
    info = embedding_info(model, embedding)
    if isinstance(to, model):
        key = getattr(to, info.model_key.key)
        return info.distance_to(select(info.embedding).where(info.key == key).scalar_subquery())
    return info.distance_to(_vector(to, info))


def search_settings(
    info: EmbeddingInfo, candidates: int, *, ef_search: int | None = None, probes: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The settings a search for ``candidates`` rows needs; empty when the server defaults do."""
    settings: dict[str, int] = {}
    ef = ef_search or info.ef_search
    if candidates > (ef or HNSW_EF_SEARCH):
        ef = candidates
    if ef is not None:
        ef = min(ef, MAX_EF_SEARCH)
        settings["hnsw.ef_search"] = ef
    probes = probes or info.probes
    if probes is not None:
        settings["ivfflat.probes"] = probes
    return tuple((name, str(value)) for name, value in sorted(settings.items()))


def _vector(value: Any, info: EmbeddingInfo) -> ColumnElement[Any]:
    if isinstance(value, ColumnElement):  # e.g. bindparam("query", type_=Vector(dim)), for a reusable statement
        return value
    size = value.dimensions() if hasattr(value, "dimensions") else len(value)
    if size != info.dim:
        raise ValueError(f"embedding {info.name!r} has dimension {info.dim}, the query vector has {size}")
    return literal(value, HALFVEC(info.dim) if info.storage == "halfvec" else Vector(info.dim))


def _quantized(vector: Any, dim: int) -> ColumnElement[Any]:
    """``binary_quantize(vector)::bit(dim)``: what the index of a ``bit`` embedding covers."""
    return cast(func.binary_quantize(vector), BIT(dim))


def _filter(model: type, where: Mapping[str, Any]) -> ColumnElement[Any] | None:
    """``where`` as the SQL functions' filter, a JSON object of source column names and values;
    None when an attribute is not a plain column (a hybrid property, a relationship)."""
    mapper: Mapper[Any] = inspect(model)
    columns: dict[str, Any] = {}
    for name, value in where.items():
        prop = mapper.attrs.get(name)
        if not isinstance(prop, ColumnProperty) or len(prop.columns) != 1:
            return None
        columns[prop.columns[0].name] = value
    return cast(literal(json.dumps(columns, default=str)), JSONB)


def _conditions(model: type, where: Any) -> list[Any]:
    if where is None:
        return []
    if isinstance(where, Mapping):
        return [getattr(model, name) == value for name, value in where.items()]
    if isinstance(where, Sequence) and not isinstance(where, str):
        return list(where)
    return [where]


@event.listens_for(Engine, "before_cursor_execute")
def _apply_search_settings(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
    settings = context.execution_options.get(SETTINGS_OPTION) if context is not None else None
    if not settings:
        return
    # In a transaction the settings end with it; in autocommit mode they stay with the connection.
    local = not getattr(conn.connection.dbapi_connection, "autocommit", False)
    calls = ", ".join(
        "CASE WHEN v.iterative THEN set_config(%s, %s, %s) END" if setting in ITERATIVE_SCAN
        else "set_config(%s, %s, %s)"
        for setting in settings
    )
    cursor.execute(
        f"SELECT {calls} FROM (SELECT coalesce((SELECT string_to_array(split_part(x.extversion, '-', 1), '.')::int[]"
        " >= '{0,8}' FROM pg_extension x WHERE x.extname = 'vector'), false) AS iterative) v",
        [part for name, value in settings for part in (name, value, local)],
    )
