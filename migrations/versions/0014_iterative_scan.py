"""Filtered searches through the index: iterative index scans on pgvector >= 0.8.

An HNSW scan yields ef_search candidates (IVFFlat: those of ``probes`` lists) before a filter
applies, so a filter that keeps 1 % of the rows used to leave fewer than k matches and fall back to
comparing every matching row. On pgvector >= 0.8, ``vectorsync._search`` (behind ``nearest_where``,
``nearest_to_where``, ``nearest`` and ``nearest_to``) turns on ``hnsw.iterative_scan`` /
``ivfflat.iterative_scan`` = ``relaxed_order``: the index keeps yielding candidates until k rows
match, up to ``hnsw.max_scan_tuples`` (20,000) tuples or ``ivfflat.max_probes`` (all lists). The
rows are sorted again by their exact distance, and only when the bounded scan still finds fewer
than k rows is the search exact. On older pgvector nothing changes.

Revision ID: 0014_iterative_scan
Revises: 0013_capture_status
"""

from vectorsync.migrations.replaceable import Function, create, drop, replace

revision = "0014_iterative_scan"
down_revision = "0013_capture_status"
branch_labels = None
depends_on = None


# Turns iterative index scans on for the current transaction where the server's pgvector has them
# (0.8 and later; an older pgvector reserves the hnsw prefix and refuses unknown settings). Returns
# whether it did.
_iterative_scan = Function(
    "vectorsync._iterative_scan",
    "",
    "boolean",
    "LANGUAGE plpgsql VOLATILE",
    r"""
DECLARE
    version integer[] := (SELECT string_to_array(split_part(x.extversion, '-', 1), '.')::integer[]
                            FROM pg_extension x WHERE x.extname = 'vector');
BEGIN
    IF version IS NULL OR version < ARRAY[0, 8] THEN
        RETURN false;
    END IF;
    PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
    -- the bound on one filtered search: past it, the exact scan takes over
    PERFORM set_config('hnsw.max_scan_tuples', '20000', true);
    PERFORM set_config('ivfflat.iterative_scan', 'relaxed_order', true);
    RETURN true;
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
    iterative := vectorsync._iterative_scan();
    -- Without iterative scans an HNSW scan yields at most ef_search rows, and ef_search stops at
    -- 1000: beyond, compare all.
    IF e.index_kind <> 'hnsw' OR iterative OR candidates <= vectorsync._ef_search(e, NULL, candidates) THEN
        PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, candidates), probes);
        -- Iterative scans yield rows in relaxed order: array_agg sorts them by exact distance. When
        -- the (bounded) scan finds fewer than k matching rows, compare every matching row instead.
        EXECUTE format('SELECT array_agg(r.key ORDER BY r.distance), array_agg(r.distance ORDER BY r.distance) '
                       'FROM (%s) r', vectorsync._search_sql(e, filter))
            INTO keys, distances USING query, exclude_key, k, filter;
        IF coalesce(cardinality(keys), 0) >= k THEN
            RETURN QUERY SELECT u.key, u.distance FROM unnest(keys, distances) AS u (key, distance);
            RETURN;
        END IF;
    END IF;
    RETURN QUERY EXECUTE vectorsync._search_sql(e, filter, exact => true) USING query, exclude_key, k, filter;
END
""",
)


def upgrade() -> None:
    create(_iterative_scan)
    replace(_search, replaces="0008_query_safety._search")


def downgrade() -> None:
    replace(_search, replace_with="0008_query_safety._search")
    drop(_iterative_scan)
