"""Query functions: filtered nearest neighbours (``vectorsync.nearest_where``,
``vectorsync.nearest_to_where``), the k-NN join (``vectorsync.knn_join``) and the status view
(``vectorsync.status``, ``vectorsync.embedding_status``)::

    SELECT * FROM vectorsync.nearest_where('items', '42', 10, '{"category": "shoes"}');
    SELECT * FROM vectorsync.nearest_to_where('items', '[0.1, 0.2, 0.3]', 10, '{"in_stock": true}');
    SELECT * FROM vectorsync.knn_join('items', ARRAY['1', '2', '3'], 5);
    SELECT * FROM vectorsync.status;

Identifiers come from vectorsync.embeddings and the filter's keys, and are always quoted with
format('%I'); filter values travel as a query parameter, never as SQL text. The query text each
function runs comes from vectorsync._search_sql / vectorsync._knn_join_sql, so EXPLAIN can be run
on exactly that text (PREPARE q AS <text>; EXPLAIN EXECUTE q(...)).

Revision ID: 0004_query_functions
Revises: 0003_similarity_functions
"""

from vectorsync.migrations.replaceable import Function, View, create, drop

revision = "0004_query_functions"
down_revision = "0003_similarity_functions"
branch_labels = None
depends_on = None


# hnsw.ef_search below k makes an HNSW scan return fewer than k rows, so k raises it.
_ef_search = Function(
    "vectorsync._ef_search",
    "e vectorsync.embeddings, ef_search integer, k integer",
    "integer",
    "LANGUAGE sql IMMUTABLE",
    r"""
    SELECT greatest(coalesce(ef_search, e.ef_search, 40), k)
""",
)


# ' AND s.<column> = CAST($<param> ->> <column> AS <type>)' for each {column: value} of the filter
# (' AND s.<column> IS NULL' for a JSON null); '' for no filter. Unknown columns are refused.
_filter_sql = Function(
    "vectorsync._filter_sql",
    "e vectorsync.embeddings, filter jsonb, param integer",
    "text",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    clause text := '';
    col text;
    val jsonb;
    col_type text;
BEGIN
    IF filter IS NULL OR filter = '{}'::jsonb THEN
        RETURN '';
    END IF;
    IF jsonb_typeof(filter) <> 'object' THEN
        RAISE EXCEPTION 'vectorsync: the filter must be a JSON object of {column: value}, got %', filter;
    END IF;
    FOR col, val IN SELECT f.key, f.value FROM jsonb_each(filter) f ORDER BY f.key LOOP
        SELECT format_type(a.atttypid, a.atttypmod) INTO col_type
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass(format('%I.%I', e.source_schema, e.source_table))
          AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF col_type IS NULL THEN
            RAISE EXCEPTION 'vectorsync: column % not found in table %.% of embedding %',
                quote_ident(col), quote_ident(e.source_schema), quote_ident(e.source_table), e.name
                USING HINT = 'filter keys are column names of the source table';
        END IF;
        IF jsonb_typeof(val) = 'null' THEN
            clause := clause || format(' AND s.%I IS NULL', col);
        ELSE
            -- format_type() output is already a quoted, valid type name
            clause := clause || format(' AND s.%I = CAST($%s ->> %L AS %s)', col, param, col, col_type);
        END IF;
    END LOOP;
    RETURN clause;
END
""",
)


# The query behind nearest_where / nearest_to_where. Parameters: $1 query vector, $2 key to leave
# out (text, or NULL), $3 k, $4 filter. With exact, the ORDER BY no longer matches the index and
# every (filtered) row is compared: the fallback when the index scan cannot find k filtered rows.
_search_sql = Function(
    "vectorsync._search_sql",
    "e vectorsync.embeddings, filter jsonb, exact boolean DEFAULT false",
    "text",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    op text := vectorsync._operator(e.distance);
    join_source text := '';
BEGIN
    IF filter IS NOT NULL AND filter <> '{}'::jsonb THEN
        join_source := format(' JOIN %I.%I s ON s.%I = t.%I', e.source_schema, e.source_table, e.key_column,
                              e.key_column);
    END IF;
    RETURN format(
        'SELECT t.%1$I::text AS key, (t.embedding %2$s $1)::float8 AS distance FROM %3$I.%4$I t%5$s '
        'WHERE ($2::text IS NULL OR t.%1$I <> CAST($2 AS %6$s))%7$s ORDER BY %8$s LIMIT $3',
        e.key_column, op, e.target_schema, e.target_table, join_source, e.key_type,
        vectorsync._filter_sql(e, filter, 4),
        CASE WHEN exact THEN format('(t.embedding %s $1) + 0', op) ELSE format('t.embedding %s $1', op) END);
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
    keys text[];
    distances double precision[];
BEGIN
    IF vector_dims(query) <> e.dim THEN
        RAISE EXCEPTION 'vectorsync: embedding % has dimension %, the query vector has %',
            e.name, e.dim, vector_dims(query);
    END IF;
    -- one more candidate when the query row itself is left out
    PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, k + (exclude_key IS NOT NULL)::integer), probes);
    IF filter IS NULL OR filter = '{}'::jsonb THEN
        RETURN QUERY EXECUTE vectorsync._search_sql(e, filter) USING query, exclude_key, k, filter;
        RETURN;
    END IF;
    -- The index yields ef_search (HNSW) or probes' lists' (IVFFlat) candidates before the filter
    -- applies; when fewer than k of them match, compare every matching row instead.
    EXECUTE format('SELECT array_agg(r.key ORDER BY r.distance), array_agg(r.distance ORDER BY r.distance) '
                   'FROM (%s) r', vectorsync._search_sql(e, filter))
        INTO keys, distances USING query, exclude_key, k, filter;
    IF coalesce(cardinality(keys), 0) < k THEN
        RETURN QUERY EXECUTE vectorsync._search_sql(e, filter, exact => true) USING query, exclude_key, k, filter;
    ELSE
        RETURN QUERY SELECT u.key, u.distance FROM unnest(keys, distances) AS u (key, distance);
    END IF;
END
""",
)


# The embedding of row `of_key`, or an error that says how to get one.
_embedding_of = Function(
    "vectorsync._embedding_of",
    "e vectorsync.embeddings, of_key text",
    "vector",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    q vector;
BEGIN
    EXECUTE format('SELECT embedding FROM %I.%I WHERE %I = CAST($1 AS %s)',
                   e.target_schema, e.target_table, e.key_column, e.key_type)
        INTO q USING of_key;
    IF q IS NULL THEN
        RAISE EXCEPTION 'vectorsync: row % of embedding % has no embedding yet', of_key, e.name
            USING HINT = 'run vectorsync sync, or check vectorsync.failed';
    END IF;
    RETURN q;
END
""",
)


# The k rows nearest to row `of_key` (itself excluded) among source rows matching `filter`, an
# equality filter on source columns: '{"category": "shoes", "discontinued": false}'.
nearest_where = Function(
    "vectorsync.nearest_where",
    (
        "embedding_name text, of_key text, k integer DEFAULT 10, filter jsonb DEFAULT '{}', "
        "ef_search integer DEFAULT NULL, probes integer DEFAULT NULL"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
DECLARE
    e vectorsync.embeddings := vectorsync._embedding(embedding_name);
BEGIN
    RETURN QUERY SELECT * FROM vectorsync._search(e, vectorsync._embedding_of(e, of_key), k, filter, of_key,
                                                 ef_search, probes);
END
""",
)


# The k rows nearest to a given vector among source rows matching `filter`.
nearest_to_where = Function(
    "vectorsync.nearest_to_where",
    (
        "embedding_name text, query vector, k integer DEFAULT 10, filter jsonb DEFAULT '{}', "
        "ef_search integer DEFAULT NULL, probes integer DEFAULT NULL"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
BEGIN
    RETURN QUERY SELECT * FROM vectorsync._search(vectorsync._embedding(embedding_name), query, k, filter, NULL,
                                                 ef_search, probes);
END
""",
)


# The query behind knn_join: for each key in $1 (all embedded rows when NULL) its $2 nearest
# rows, one index scan per key (LATERAL), ranked 1..k.
_knn_join_sql = Function(
    "vectorsync._knn_join_sql",
    "e vectorsync.embeddings",
    "text",
    "LANGUAGE sql STABLE",
    r"""
    SELECT format(
        'SELECT q.%1$I::text AS key, n.neighbour, n.distance, '
        'row_number() OVER (PARTITION BY q.%1$I ORDER BY n.distance, n.neighbour)::integer AS rank '
        'FROM %2$I.%3$I q CROSS JOIN LATERAL ('
        'SELECT t.%1$I::text AS neighbour, (t.embedding %4$s q.embedding)::float8 AS distance '
        'FROM %2$I.%3$I t WHERE t.%1$I <> q.%1$I ORDER BY t.embedding %4$s q.embedding LIMIT $2) n '
        'WHERE $1::text[] IS NULL OR q.%1$I = ANY(CAST($1 AS %5$s[])) '
        'ORDER BY q.%1$I, rank',
        e.key_column, e.target_schema, e.target_table, vectorsync._operator(e.distance), e.key_type)
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
BEGIN
    PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, k + 1), probes);  -- + the key itself
    RETURN QUERY EXECUTE vectorsync._knn_join_sql(e) USING keys, k;
END
""",
)


# One row per embedding (or only `embedding_name`): how far its vectors are from its source rows.
# lag_seconds is the age of the oldest queued change (0 when nothing is pending).
embedding_status = Function(
    "vectorsync.embedding_status",
    "embedding_name text DEFAULT NULL",
    (
        "TABLE (name text, source_rows bigint, embedded bigint, embedded_current_model bigint, pending bigint, "
        "failed bigint, model_version integer, lag_seconds double precision, last_embedded timestamptz, "
        "last_sync timestamptz)"
    ),
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    e vectorsync.embeddings;
BEGIN
    FOR e IN SELECT * FROM vectorsync.embeddings WHERE embedding_name IS NULL OR vectorsync.embeddings.name = embedding_name
             ORDER BY vectorsync.embeddings.name LOOP
        name := e.name;
        model_version := e.current_version;
        last_sync := e.last_sync;
        source_rows := NULL;
        IF to_regclass(format('%I.%I', e.source_schema, e.source_table)) IS NOT NULL THEN
            EXECUTE format('SELECT count(*) FROM %I.%I', e.source_schema, e.source_table) INTO source_rows;
        END IF;
        embedded := 0;
        embedded_current_model := 0;
        last_embedded := NULL;
        IF to_regclass(format('%I.%I', e.target_schema, e.target_table)) IS NOT NULL THEN
            EXECUTE format('SELECT count(*), count(*) FILTER (WHERE model_version = $1), max(embedded_at) '
                           'FROM %I.%I', e.target_schema, e.target_table)
                INTO embedded, embedded_current_model, last_embedded USING e.current_version;
        END IF;
        SELECT count(DISTINCT q.key), coalesce(extract(epoch FROM now() - min(q.enqueued_at))::float8, 0)
          INTO pending, lag_seconds FROM vectorsync.queue q WHERE q.embedding = e.name;
        SELECT count(*) INTO failed FROM vectorsync.failed f WHERE f.embedding = e.name;
        RETURN NEXT;
    END LOOP;
END
""",
)


FUNCTIONS = [
    _ef_search,
    _filter_sql,
    _search_sql,
    _search,
    _embedding_of,
    nearest_where,
    nearest_to_where,
    _knn_join_sql,
    knn_join,
    embedding_status,
]

status = View("vectorsync.status", "SELECT * FROM vectorsync.embedding_status()")


def upgrade() -> None:
    for function in FUNCTIONS:
        create(function)
    create(status)


def downgrade() -> None:
    drop(status)
    for function in reversed(FUNCTIONS):
        drop(function)
