-- vectorsync similarity functions, v1. Installed by migration 0003_similarity_functions.
-- Every function reads the embedding's target table, key and distance from vectorsync.embeddings,
-- orders by the spec's distance operator (so the HNSW / IVFFlat index serves the query) and sets
-- hnsw.ef_search / ivfflat.probes for the current transaction from the spec.

CREATE FUNCTION vectorsync._embedding(embedding_name text) RETURNS vectorsync.embeddings
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    e vectorsync.embeddings;
BEGIN
    SELECT * INTO e FROM vectorsync.embeddings WHERE name = embedding_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vectorsync: no embedding named %', embedding_name
            USING HINT = 'SELECT name FROM vectorsync.embeddings lists them';
    END IF;
    RETURN e;
END
$fn$;

CREATE FUNCTION vectorsync._operator(distance text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' WHEN 'inner_product' THEN '<#>' END
$fn$;

CREATE FUNCTION vectorsync._tune(e vectorsync.embeddings, ef_search integer, probes integer) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('hnsw.ef_search', coalesce(ef_search, e.ef_search, 40)::text, true);
    PERFORM set_config('ivfflat.probes', coalesce(probes, e.probes, 10)::text, true);
END
$fn$;

-- The k rows nearest to the row whose key is `of_key` (itself excluded).
CREATE FUNCTION vectorsync.nearest(embedding_name text, of_key text, k integer DEFAULT 10,
                                   ef_search integer DEFAULT NULL, probes integer DEFAULT NULL)
RETURNS TABLE (key text, distance double precision)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    e vectorsync.embeddings := vectorsync._embedding(embedding_name);
    q vector;
BEGIN
    PERFORM vectorsync._tune(e, ef_search, probes);
    EXECUTE format('SELECT embedding FROM %I.%I WHERE %I = CAST($1 AS %s)',
                   e.target_schema, e.target_table, e.key_column, e.key_type)
        INTO q USING of_key;
    IF q IS NULL THEN
        RAISE EXCEPTION 'vectorsync: row % of embedding % has no embedding yet', of_key, embedding_name
            USING HINT = 'run vectorsync sync, or check vectorsync.failed';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT t.%1$I::text, (t.embedding %4$s $1)::float8 FROM %2$I.%3$I t '
        'WHERE t.%1$I <> CAST($2 AS %5$s) ORDER BY t.embedding %4$s $1 LIMIT $3',
        e.key_column, e.target_schema, e.target_table, vectorsync._operator(e.distance), e.key_type)
        USING q, of_key, k;
END
$fn$;

-- The k rows nearest to a given vector.
CREATE FUNCTION vectorsync.nearest_to(embedding_name text, query vector, k integer DEFAULT 10,
                                      ef_search integer DEFAULT NULL, probes integer DEFAULT NULL)
RETURNS TABLE (key text, distance double precision)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    e vectorsync.embeddings := vectorsync._embedding(embedding_name);
BEGIN
    IF vector_dims(query) <> e.dim THEN
        RAISE EXCEPTION 'vectorsync: embedding % has dimension %, the query vector has %',
            embedding_name, e.dim, vector_dims(query);
    END IF;
    PERFORM vectorsync._tune(e, ef_search, probes);
    RETURN QUERY EXECUTE format(
        'SELECT t.%1$I::text, (t.embedding %4$s $1)::float8 FROM %2$I.%3$I t '
        'ORDER BY t.embedding %4$s $1 LIMIT $2',
        e.key_column, e.target_schema, e.target_table, vectorsync._operator(e.distance))
        USING query, k;
END
$fn$;
