"""Query functions that are safe for any caller.

- They run as the caller and first check that the caller may read the embedding's source table: a
  role that cannot read the source learns no key or distance (``insufficient_privilege``).
- No catalogue value is spliced into SQL text: tables resolve through ``vectorsync._target`` /
  ``_source`` (``regclass``), the key type through ``vectorsync._key_type`` (``regtype``, which
  refuses anything that is not a type name), identifiers through ``format('%I')``.
- k is checked (at least 1) and may go to 10,000 and beyond: hnsw.ef_search is raised to k only up
  to pgvector's limit of 1000; above it, or when the index finds fewer than k rows, the search is
  exact. A NULL query vector is refused.
- Filters compare in the column's own type without its length or precision (a cast to
  ``varchar(3)`` would truncate the value and match the wrong rows).
- ``vectorsync.status`` counts the queue and failed items through ``vectorsync._backlog``, which
  reveals counts only, so readers need no right on the queue's keys.

Revision ID: 0008_query_safety
Revises: 0007_training_history
"""

from vectorsync.migrations.replaceable import Function, create, drop, replace

revision = "0008_query_safety"
down_revision = "0007_training_history"
branch_labels = None
depends_on = None


# The source table of an embedding; a missing one is an error that says what to run.
_source = Function(
    "vectorsync._source",
    "e vectorsync.embeddings",
    "regclass",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    found regclass := to_regclass(format('%I.%I', e.source_schema, e.source_table));
BEGIN
    IF found IS NULL THEN
        RAISE EXCEPTION 'vectorsync: the source table %.% of embedding % does not exist',
            quote_ident(e.source_schema), quote_ident(e.source_table), e.name
            USING HINT = 'restore the table, or fix the config and run vectorsync migrate';
    END IF;
    RETURN found;
END
""",
)


# The table that holds the vectors queries read: every query function resolves it here and nowhere
# else. With missing_ok, a missing table is NULL instead of an error.
_target = Function(
    "vectorsync._target",
    "e vectorsync.embeddings, missing_ok boolean DEFAULT false",
    "regclass",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    found regclass := to_regclass(format('%I.%I', e.target_schema, e.target_table));
BEGIN
    IF found IS NULL AND NOT missing_ok THEN
        RAISE EXCEPTION 'vectorsync: the table %.% of embedding % does not exist',
            quote_ident(e.target_schema), quote_ident(e.target_table), e.name
            USING HINT = 'run vectorsync migrate';
    END IF;
    RETURN found;
END
""",
)


# The key's type, parsed as a type name (without length or precision, so casts never truncate):
# the catalogue's text never reaches SQL as written.
_key_type = Function(
    "vectorsync._key_type",
    "e vectorsync.embeddings",
    "regtype",
    "LANGUAGE plpgsql STABLE",
    r"""
BEGIN
    RETURN e.key_type::regtype;
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'vectorsync: the key type % recorded for embedding % is not a type name', quote_literal(e.key_type), e.name
        USING HINT = 'run vectorsync migrate to record it again', ERRCODE = 'data_exception';
END
""",
)


_check_k = Function(
    "vectorsync._check_k",
    "k integer",
    "void",
    "LANGUAGE plpgsql IMMUTABLE",
    r"""
BEGIN
    IF k IS NULL OR k < 1 THEN
        RAISE EXCEPTION 'vectorsync: k must be a positive number of rows, got %', coalesce(k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
""",
)


# Queued and failed counts of an embedding. It runs as vectorsync's owner so that status needs no
# right on the queue, whose rows hold keys; it returns counts only.
_backlog = Function(
    "vectorsync._backlog",
    "embedding_name text",
    "TABLE (pending bigint, lag_seconds double precision, failed bigint)",
    "LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp",
    r"""
    SELECT (SELECT count(DISTINCT q.key) FROM vectorsync.queue q WHERE q.embedding = embedding_name),
           (SELECT coalesce(extract(epoch FROM now() - min(q.enqueued_at))::float8, 0)
              FROM vectorsync.queue q WHERE q.embedding = embedding_name),
           (SELECT count(*) FROM vectorsync.failed f WHERE f.embedding = embedding_name)
""",
)


# The embedding named `embedding_name`, once the caller is known to be allowed to read its source.
_embedding = Function(
    "vectorsync._embedding",
    "embedding_name text",
    "vectorsync.embeddings",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    e vectorsync.embeddings;
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
    RETURN e;
END
""",
)


# hnsw.ef_search below k makes an HNSW scan return fewer than k rows, so k raises it, up to the
# largest value pgvector accepts.
_ef_search = Function(
    "vectorsync._ef_search",
    "e vectorsync.embeddings, ef_search integer, k integer",
    "integer",
    "LANGUAGE sql IMMUTABLE",
    r"""
    SELECT least(greatest(coalesce(ef_search, e.ef_search, 40), k), 1000)
""",
)


# ' AND s.<column> = CAST($<param> ->> <column> AS <type>)' for each {column: value} of the filter
# (' AND s.<column> IS NULL' for a JSON null); '' for no filter. Unknown columns are refused. The
# type is the column's own without length or precision, so the value is never truncated.
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
    col_type regtype;
BEGIN
    IF filter IS NULL OR filter = '{}'::jsonb THEN
        RETURN '';
    END IF;
    IF jsonb_typeof(filter) <> 'object' THEN
        RAISE EXCEPTION 'vectorsync: the filter must be a JSON object of {column: value}, got %', filter;
    END IF;
    FOR col, val IN SELECT f.key, f.value FROM jsonb_each(filter) f ORDER BY f.key LOOP
        SELECT a.atttypid::regtype INTO col_type
        FROM pg_attribute a
        WHERE a.attrelid = vectorsync._source(e) AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF col_type IS NULL THEN
            RAISE EXCEPTION 'vectorsync: column % not found in table % of embedding %',
                quote_ident(col), vectorsync._source(e), e.name
                USING HINT = 'filter keys are column names of the source table';
        END IF;
        IF jsonb_typeof(val) = 'null' THEN
            clause := clause || format(' AND s.%I IS NULL', col);
        ELSE
            clause := clause || format(' AND s.%I = CAST($%s ->> %L AS %s)', col, param, col, col_type);
        END IF;
    END LOOP;
    RETURN clause;
END
""",
)


# The query behind nearest_where / nearest_to_where. Parameters: $1 query vector, $2 key to leave
# out (text, or NULL), $3 k, $4 filter. With exact, the ORDER BY no longer matches the index and
# every (filtered) row is compared.
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
        join_source := format(' JOIN %s s ON s.%I = t.%I', vectorsync._source(e), e.key_column, e.key_column);
    END IF;
    RETURN format(
        'SELECT t.%1$I::text AS key, (t.embedding %2$s $1)::float8 AS distance FROM %3$s t%4$s '
        'WHERE ($2::text IS NULL OR t.%1$I <> CAST($2 AS %5$s))%6$s ORDER BY %7$s LIMIT $3',
        e.key_column, op, vectorsync._target(e), join_source, vectorsync._key_type(e),
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
    -- one more candidate when the query row itself is left out
    candidates integer := k + (exclude_key IS NOT NULL)::integer;
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
    -- An HNSW scan yields at most ef_search rows, and ef_search stops at 1000: beyond, compare all.
    IF e.index_kind <> 'hnsw' OR candidates <= vectorsync._ef_search(e, NULL, candidates) THEN
        PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, candidates), probes);
        -- The index yields ef_search (HNSW) or probes' lists' (IVFFlat) candidates before the
        -- filter applies; when fewer than k of them match, compare every matching row instead.
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
    EXECUTE format('SELECT embedding FROM %s WHERE %I = CAST($1 AS %s)',
                   vectorsync._target(e), e.key_column, vectorsync._key_type(e))
        INTO q USING of_key;
    IF q IS NULL THEN
        RAISE EXCEPTION 'vectorsync: row % of embedding % has no embedding yet', of_key, e.name
            USING HINT = 'run vectorsync sync, or check vectorsync.failed';
    END IF;
    RETURN q;
END
""",
)


# The query behind knn_join: for each key in $1 (all embedded rows when NULL) its $2 nearest
# rows, one index scan per key (LATERAL), ranked 1..k; with exact, every row is compared.
_knn_join_sql = Function(
    "vectorsync._knn_join_sql",
    "e vectorsync.embeddings, exact boolean DEFAULT false",
    "text",
    "LANGUAGE sql STABLE",
    r"""
    SELECT format(
        'SELECT q.%1$I::text AS key, n.neighbour, n.distance, '
        'row_number() OVER (PARTITION BY q.%1$I ORDER BY n.distance, n.neighbour)::integer AS rank '
        'FROM %2$s q CROSS JOIN LATERAL ('
        'SELECT t.%1$I::text AS neighbour, (t.embedding %3$s q.embedding)::float8 AS distance '
        'FROM %2$s t WHERE t.%1$I <> q.%1$I ORDER BY %5$s LIMIT $2) n '
        'WHERE $1::text[] IS NULL OR q.%1$I = ANY(CAST($1 AS %4$s[])) '
        'ORDER BY q.%1$I, rank',
        e.key_column, vectorsync._target(e), vectorsync._operator(e.distance), vectorsync._key_type(e),
        format(CASE WHEN exact THEN '(t.embedding %s q.embedding) + 0' ELSE 't.embedding %s q.embedding' END,
               vectorsync._operator(e.distance)))
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
    PERFORM vectorsync._check_k(k);
    IF e.index_kind = 'hnsw' AND k + 1 > vectorsync._ef_search(e, NULL, k + 1) THEN  -- + the key itself
        RETURN QUERY EXECUTE vectorsync._knn_join_sql(e, exact => true) USING keys, k;
        RETURN;
    END IF;
    PERFORM vectorsync._tune(e, vectorsync._ef_search(e, ef_search, k + 1), probes);
    RETURN QUERY EXECUTE vectorsync._knn_join_sql(e) USING keys, k;
END
""",
)


# One row per embedding (or only `embedding_name`): how far its vectors are from its source rows.
# lag_seconds is the age of the oldest queued change (0 when nothing is pending). A caller that
# may not read an embedding's source table gets a permission error, as from the query functions.
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
    source regclass;
    target regclass;
BEGIN
    FOR e IN SELECT * FROM vectorsync.embeddings
             WHERE embedding_name IS NULL OR vectorsync.embeddings.name = embedding_name
             ORDER BY vectorsync.embeddings.name LOOP
        name := e.name;
        model_version := e.current_version;
        last_sync := e.last_sync;
        source_rows := NULL;
        source := to_regclass(format('%I.%I', e.source_schema, e.source_table));
        IF source IS NOT NULL THEN
            IF NOT has_table_privilege(source, 'SELECT') THEN
                RAISE EXCEPTION 'vectorsync: permission denied for table %, the source of embedding %', source, e.name
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'a role that may SELECT from the source table may see its status';
            END IF;
            EXECUTE format('SELECT count(*) FROM %s', source) INTO source_rows;
        END IF;
        embedded := 0;
        embedded_current_model := 0;
        last_embedded := NULL;
        target := vectorsync._target(e, missing_ok => true);
        IF target IS NOT NULL THEN
            EXECUTE format('SELECT count(*), count(*) FILTER (WHERE model_version = $1), max(embedded_at) FROM %s',
                           target)
                INTO embedded, embedded_current_model, last_embedded USING e.current_version;
        END IF;
        SELECT b.pending, b.lag_seconds, b.failed INTO pending, lag_seconds, failed
          FROM vectorsync._backlog(e.name) b;
        RETURN NEXT;
    END LOOP;
END
""",
)


NEW = [_source, _target, _key_type, _check_k, _backlog]
REPLACED = {
    "0003_similarity_functions": [_embedding],
    "0004_query_functions": [
        _ef_search,
        _filter_sql,
        _search_sql,
        _search,
        _embedding_of,
        _knn_join_sql,
        knn_join,
        embedding_status,
    ],
}


def upgrade() -> None:
    for function in NEW:
        create(function)
    for revision_id, functions in REPLACED.items():
        for function in functions:
            replace(function, replaces=f"{revision_id}.{function.name.removeprefix('vectorsync.')}")


def downgrade() -> None:
    for revision_id, functions in REPLACED.items():
        for function in functions:
            replace(function, replace_with=f"{revision_id}.{function.name.removeprefix('vectorsync.')}")
    for function in reversed(NEW):
        drop(function)
