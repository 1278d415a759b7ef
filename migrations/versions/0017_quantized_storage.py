"""Quantized storage: ``storage = "vector" | "halfvec" | "bit"`` per embedding, recorded per generation.

- ``halfvec``: the generation's column is ``halfvec(dim)`` and so is its index; a query vector is
  compared in half precision (``$1::halfvec``), so the index serves it.
- ``bit``: the column keeps the full vector; the index covers
  ``binary_quantize(embedding::vector)::bit(dim)`` (Hamming distance). A search takes 10 times k
  candidates by that index and returns the k nearest of them by the full-precision distance; an
  exact search compares full vectors as before.

``vectorsync.embeddings.storage`` is the spec's, ``vectorsync.generations.storage`` each
generation's; ``vectorsync._embedding`` hands the query functions the one in service. Existing
generations are ``vector``.

Revision ID: 0017_quantized_storage
Revises: 0016_graphsage_capture
"""

from alembic import op

from vectorsync.migrations.operations import execute_script
from vectorsync.migrations.replaceable import Function, replace

revision = "0017_quantized_storage"
down_revision = "0016_graphsage_capture"
branch_labels = None
depends_on = None

STORAGE_COLUMNS = """
ALTER TABLE vectorsync.embeddings ADD COLUMN storage text NOT NULL DEFAULT 'vector'
    CHECK (storage IN ('vector', 'halfvec', 'bit'));
ALTER TABLE vectorsync.generations ADD COLUMN storage text NOT NULL DEFAULT 'vector'
    CHECK (storage IN ('vector', 'halfvec', 'bit'));
"""

_embedding = Function(
    "vectorsync._embedding",
    "embedding_name text",
    "vectorsync.embeddings",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    e vectorsync.embeddings;
    g vectorsync.generations;
    source regclass;
BEGIN
    SELECT * INTO e FROM vectorsync.embeddings WHERE name = embedding_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vectorsync: no embedding named %', embedding_name
            USING HINT = 'SELECT name FROM vectorsync.embeddings lists them';
    END IF;
    source := vectorsync._source(e);
    IF NOT has_table_privilege(source, 'SELECT') THEN
        RAISE EXCEPTION 'vectorsync: permission denied for table %, the source of embedding %', source, e.name
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a role that may SELECT from the source table may query its embeddings';
    END IF;
    -- Read once per query: every statement of the query then reads this generation's table, so a
    -- swap committed meanwhile cannot put vectors of two models into one answer.
    SELECT * INTO g FROM vectorsync.generations WHERE embedding = embedding_name AND state = 'serving';
    IF FOUND THEN
        e.target_schema := g.table_schema;
        e.target_table := g.table_name;
        e.dim := g.dim;
        e.distance := g.distance;
        e.storage := g.storage;
    END IF;
    RETURN e;
END
""",
)


# The query behind nearest_where / nearest_to_where. Parameters: $1 query vector, $2 key to leave
# out (text, or NULL), $3 k, $4 filter, $5 candidates a bit index yields for re-ranking. With
# exact, the ORDER BY no longer matches the index and every (filtered) row is compared.
_search_sql = Function(
    "vectorsync._search_sql",
    "e vectorsync.embeddings, filter jsonb, exact boolean DEFAULT false",
    "text",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    op text := vectorsync._operator(e.distance);
    -- a halfvec column is compared, and indexed, in half precision
    q text := CASE WHEN e.storage = 'halfvec' THEN '$1::halfvec' ELSE '$1' END;
    join_source text := '';
    conditions text;
BEGIN
    IF filter IS NOT NULL AND filter <> '{}'::jsonb THEN
        join_source := format(' JOIN %s s ON s.%I = t.%I', vectorsync._source(e), e.key_column, e.key_column);
    END IF;
    conditions := format('WHERE ($2::text IS NULL OR t.%I <> CAST($2 AS %s))%s',
                         e.key_column, vectorsync._key_type(e), vectorsync._filter_sql(e, filter, 4));
    IF e.storage = 'bit' AND NOT exact AND e.index_kind <> 'none' THEN
        -- the $5 nearest by the Hamming distance of their binary quantization (the index's order),
        -- then the k nearest of those by the full-precision distance
        RETURN format(
            'SELECT c.key, (c.embedding %1$s $1)::float8 AS distance FROM ('
            'SELECT t.%2$I::text AS key, t.embedding FROM %3$s t%4$s %5$s '
            'ORDER BY binary_quantize(t.embedding::vector)::bit(%6$s) <~> binary_quantize($1)::bit(%6$s) LIMIT $5) c '
            'ORDER BY c.embedding %1$s $1 LIMIT $3',
            op, e.key_column, vectorsync._target(e), join_source, conditions, e.dim);
    END IF;
    RETURN format(
        'SELECT t.%1$I::text AS key, (t.embedding %2$s %3$s)::float8 AS distance FROM %4$s t%5$s %6$s '
        'ORDER BY %7$s LIMIT $3',
        e.key_column, op, q, vectorsync._target(e), join_source, conditions,
        format(CASE WHEN exact THEN '(t.embedding %s %s) + 0' ELSE 't.embedding %s %s' END, op, q));
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
    scan integer := CASE WHEN e.storage = 'bit' THEN 10 ELSE 1 END * (k + (exclude_key IS NOT NULL)::integer);
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
    IF e.index_kind <> 'hnsw' OR iterative OR scan <= vectorsync._ef_search(e, NULL, scan) THEN
        PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, scan), probes);
        -- Iterative scans yield rows in relaxed order: array_agg sorts them by exact distance (+ 0,
        -- or the planner takes the scan's claimed order for sorted and skips the sort). When the
        -- (bounded) scan finds fewer than k matching rows, compare every matching row instead.
        EXECUTE format('SELECT array_agg(r.key ORDER BY r.distance + 0), array_agg(r.distance ORDER BY r.distance + 0) '
                       'FROM (%s) r', vectorsync._search_sql(e, filter))
            INTO keys, distances USING query, exclude_key, k, filter, scan;
        IF coalesce(cardinality(keys), 0) >= k THEN
            RETURN QUERY SELECT u.key, u.distance FROM unnest(keys, distances) AS u (key, distance);
            RETURN;
        END IF;
    END IF;
    RETURN QUERY EXECUTE vectorsync._search_sql(e, filter, exact => true) USING query, exclude_key, k, filter, scan;
END
""",
)


# The query behind knn_join: for each key in $1 (all embedded rows when NULL) its $2 nearest
# rows, one index scan per key (LATERAL), ranked 1..k; with exact, every row is compared. A bit
# index yields $3 candidates per key, re-ranked by the full-precision distance.
_knn_join_sql = Function(
    "vectorsync._knn_join_sql",
    "e vectorsync.embeddings, exact boolean DEFAULT false",
    "text",
    "LANGUAGE sql STABLE",
    r"""
    SELECT format(
        'SELECT q.%1$I::text AS key, n.neighbour, n.distance, '
        'row_number() OVER (PARTITION BY q.%1$I ORDER BY n.distance, n.neighbour)::integer AS rank '
        'FROM %2$s q CROSS JOIN LATERAL (%5$s) n '
        'WHERE $1::text[] IS NULL OR q.%1$I = ANY(CAST($1 AS %4$s[])) '
        'ORDER BY q.%1$I, rank',
        e.key_column, vectorsync._target(e), vectorsync._operator(e.distance), vectorsync._key_type(e),
        CASE
            WHEN e.storage = 'bit' AND NOT exact AND e.index_kind <> 'none' THEN format(
                'SELECT c.neighbour, (c.embedding %2$s q.embedding)::float8 AS distance FROM ('
                'SELECT t.%1$I::text AS neighbour, t.embedding FROM %3$s t WHERE t.%1$I <> q.%1$I '
                'ORDER BY binary_quantize(t.embedding::vector)::bit(%4$s) '
                '<~> binary_quantize(q.embedding::vector)::bit(%4$s) LIMIT $3) c '
                'ORDER BY c.embedding %2$s q.embedding LIMIT $2',
                e.key_column, vectorsync._operator(e.distance), vectorsync._target(e), e.dim)
            ELSE format(
                'SELECT t.%1$I::text AS neighbour, (t.embedding %2$s q.embedding)::float8 AS distance '
                'FROM %3$s t WHERE t.%1$I <> q.%1$I ORDER BY %4$s LIMIT $2',
                e.key_column, vectorsync._operator(e.distance), vectorsync._target(e),
                format(CASE WHEN exact THEN '(t.embedding %s q.embedding) + 0' ELSE 't.embedding %s q.embedding' END,
                       vectorsync._operator(e.distance)))
        END)
""",
)


# For each row in `keys` (every embedded row when NULL), its k nearest rows: (key, neighbour,
# distance, rank). A k-NN graph in one statement: SELECT * FROM vectorsync.knn_join('items', NULL, 5).
knn_join = Function(
    "vectorsync.knn_join",
    (
        "embedding_name text, keys text[], k integer DEFAULT 10, ef_search integer DEFAULT NULL, "
        "probes integer DEFAULT NULL"
    ),
    "TABLE (key text, neighbour text, distance double precision, rank integer)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
DECLARE
    e vectorsync.embeddings := vectorsync._embedding(embedding_name);
    -- + the key itself; a bit index yields 10 candidates per row asked for
    scan integer := CASE WHEN e.storage = 'bit' THEN 10 ELSE 1 END * (k + 1);
BEGIN
    PERFORM vectorsync._check_k(k);
    IF e.index_kind = 'hnsw' AND scan > vectorsync._ef_search(e, NULL, scan) THEN
        RETURN QUERY EXECUTE vectorsync._knn_join_sql(e, exact => true) USING keys, k, scan;
        RETURN;
    END IF;
    PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, scan), probes);
    RETURN QUERY EXECUTE vectorsync._knn_join_sql(e) USING keys, k, scan;
END
""",
)

REPLACED = {
    "0015_generations": [_embedding],
    "0008_query_safety": [_search_sql, _knn_join_sql, knn_join],
    "0014_iterative_scan": [_search],
}


def upgrade() -> None:
    execute_script(op.get_bind(), STORAGE_COLUMNS)
    for revision_id, functions in REPLACED.items():
        for function in functions:
            replace(function, replaces=f"{revision_id}.{function.name.removeprefix('vectorsync.')}")


def downgrade() -> None:
    for revision_id, functions in REPLACED.items():
        for function in functions:
            replace(function, replace_with=f"{revision_id}.{function.name.removeprefix('vectorsync.')}")
    op.execute("ALTER TABLE vectorsync.generations DROP COLUMN storage")
    op.execute("ALTER TABLE vectorsync.embeddings DROP COLUMN storage")
