-- vectorsync.nearest / nearest_to, v2 (installed by 0005_nearest_ef_search): delegate to the
-- filtered search with an empty filter, so they share its tuning — hnsw.ef_search is raised to at
-- least k (v1 returned fewer than k rows when k exceeded ef_search) — and its dimension checks.

CREATE OR REPLACE FUNCTION vectorsync.nearest(embedding_name text, of_key text, k integer DEFAULT 10,
                                              ef_search integer DEFAULT NULL, probes integer DEFAULT NULL)
RETURNS TABLE (key text, distance double precision)
LANGUAGE sql VOLATILE AS $fn$
    SELECT * FROM vectorsync.nearest_where(embedding_name, of_key, k, '{}'::jsonb, ef_search, probes)
$fn$;

CREATE OR REPLACE FUNCTION vectorsync.nearest_to(embedding_name text, query vector, k integer DEFAULT 10,
                                                 ef_search integer DEFAULT NULL, probes integer DEFAULT NULL)
RETURNS TABLE (key text, distance double precision)
LANGUAGE sql VOLATILE AS $fn$
    SELECT * FROM vectorsync.nearest_to_where(embedding_name, query, k, '{}'::jsonb, ef_search, probes)
$fn$;
