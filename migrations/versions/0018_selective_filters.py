"""Selective filters are answered exactly.

An iterative index scan walks the index until k rows pass the filter, so a filter that keeps 1 %
of 100k rows made it visit thousands of rows and stop at its bound before it had the true k nearest
(recall 0.91, at twice the latency of comparing the matching rows). ``vectorsync._search`` now asks
the planner how many source rows the filter keeps (``EXPLAIN`` with the filter's values, so the
column statistics apply) and compares them all when they are at most 2 * sqrt(k * rows): walking
the index costs about k * rows / matches visits, comparing costs the matches, and the factor 2
leaves the index the filters it serves well (10 % of 100k rows, for k = 10).

Revision ID: 0018_selective_filters
Revises: 0017_quantized_storage
"""

from vectorsync.migrations.replaceable import Function, create, drop, replace

revision = "0018_selective_filters"
down_revision = "0017_quantized_storage"
branch_labels = None
depends_on = None


# Whether `filter` keeps so few of the source rows that comparing them all beats the index: the
# planner's estimate of the matching rows against 2 * sqrt(k * rows).
_selective = Function(
    "vectorsync._selective",
    "e vectorsync.embeddings, filter jsonb, k integer",
    "boolean",
    "LANGUAGE plpgsql VOLATILE",
    r"""
DECLARE
    plan json;
    matches double precision;
    total double precision;
BEGIN
    IF filter IS NULL OR filter = '{}'::jsonb THEN
        RETURN false;
    END IF;
    EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s s WHERE true%s',
                   vectorsync._source(e), vectorsync._filter_sql(e, filter, 1))
        INTO plan USING filter;
    matches := (plan -> 0 -> 'Plan' ->> 'Plan Rows')::double precision;
    SELECT greatest(c.reltuples, matches, 1) INTO total FROM pg_class c WHERE c.oid = vectorsync._source(e);
    RETURN matches <= 2 * sqrt(k * total);
END
""",
)


# The k rows nearest to a vector whose source rows match the filter, excluding `exclude_key`.
_search = Function(
    "vectorsync._search",
    (
        "e vectorsync.embeddings, query vector, k integer, filter jsonb, exclude_key text, ef_search integer, "
        "probes integer"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
DECLARE
    -- one more candidate when the query row itself is left out
    candidates integer := k + (exclude_key IS NOT NULL)::integer;
    -- the rows the index must yield: a bit index 10 per row asked for, re-ranked at full precision
    scan integer := CASE WHEN e.storage = 'bit' THEN 10 ELSE 1 END * candidates;
    iterative boolean;
    keys text[];
    distances double precision[];
BEGIN
    PERFORM vectorsync._check_k(k);
    IF query IS NULL THEN
        RAISE EXCEPTION 'vectorsync: the query vector for embedding % is NULL', e.name
            USING HINT = format('pass a vector of dimension %s', e.dim), ERRCODE = 'null_value_not_allowed';
    END IF;
    IF vector_dims(query) <> e.dim THEN
        RAISE EXCEPTION 'vectorsync: embedding % has dimension %, the query vector has %',
            e.name, e.dim, vector_dims(query);
    END IF;
    -- A filter that keeps few rows is answered exactly: comparing them all costs less than
    -- walking the index past every row it rejects, and finds the true k nearest.
    IF NOT vectorsync._selective(e, filter, k) THEN
        iterative := vectorsync._iterative_scan();
        -- Without iterative scans an HNSW scan yields at most ef_search rows, and ef_search stops
        -- at 1000: beyond, compare all.
        IF e.index_kind <> 'hnsw' OR iterative OR scan <= vectorsync._ef_search(e, NULL, scan) THEN
            PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, scan), probes);
            -- Iterative scans yield rows in relaxed order: array_agg sorts them by exact distance
            -- (+ 0, or the planner takes the scan's claimed order for sorted and skips the sort).
            -- When the (bounded) scan finds fewer than k matching rows, compare every matching row.
            EXECUTE format('SELECT array_agg(r.key ORDER BY r.distance + 0), '
                           'array_agg(r.distance ORDER BY r.distance + 0) FROM (%s) r',
                           vectorsync._search_sql(e, filter))
                INTO keys, distances USING query, exclude_key, k, filter, scan;
            IF coalesce(cardinality(keys), 0) >= k THEN
                RETURN QUERY SELECT u.key, u.distance FROM unnest(keys, distances) AS u (key, distance);
                RETURN;
            END IF;
        END IF;
    END IF;
    RETURN QUERY EXECUTE vectorsync._search_sql(e, filter, exact => true) USING query, exclude_key, k, filter, scan;
END
""",
)


def upgrade() -> None:
    create(_selective)
    replace(_search, replaces="0017_quantized_storage._search")


def downgrade() -> None:
    replace(_search, replace_with="0017_quantized_storage._search")
    drop(_selective)
