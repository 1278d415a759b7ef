"""Similarity functions: ``vectorsync.nearest`` and ``vectorsync.nearest_to``.

Each reads the embedding's target table, key and distance from ``vectorsync.embeddings``, orders by
the spec's distance operator (so the HNSW / IVFFlat index serves the query) and sets
``hnsw.ef_search`` / ``ivfflat.probes`` for the current transaction from the spec.

Revision ID: 0003_similarity_functions
Revises: 0002_change_capture
"""

from vectorsync.migrations.replaceable import Function, create, drop

revision = "0003_similarity_functions"
down_revision = "0002_change_capture"
branch_labels = None
depends_on = None


_embedding = Function(
    "vectorsync._embedding",
    "embedding_name text",
    "vectorsync.embeddings",
    "LANGUAGE plpgsql STABLE",
    r"""
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
""",
)


_operator = Function(
    "vectorsync._operator",
    "distance text",
    "text",
    "LANGUAGE sql IMMUTABLE",
    r"""
    SELECT CASE distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' WHEN 'inner_product' THEN '<#>' END
""",
)


_tune = Function(
    "vectorsync._tune",
    "e vectorsync.embeddings, ef_search integer, probes integer",
    "void",
    "LANGUAGE plpgsql",
    r"""
BEGIN
    PERFORM set_config('hnsw.ef_search', coalesce(ef_search, e.ef_search, 40)::text, true);
    PERFORM set_config('ivfflat.probes', coalesce(probes, e.probes, 10)::text, true);
END
""",
)


# The k rows nearest to the row whose key is `of_key` (itself excluded).
nearest = Function(
    "vectorsync.nearest",
    (
        "embedding_name text, of_key text, k integer DEFAULT 10, ef_search integer DEFAULT NULL, "
        "probes integer DEFAULT NULL"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
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
""",
)


# The k rows nearest to a given vector.
nearest_to = Function(
    "vectorsync.nearest_to",
    (
        "embedding_name text, query vector, k integer DEFAULT 10, ef_search integer DEFAULT NULL, "
        "probes integer DEFAULT NULL"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
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
""",
)


FUNCTIONS = [_embedding, _operator, _tune, nearest, nearest_to]


def upgrade() -> None:
    for function in FUNCTIONS:
        create(function)


def downgrade() -> None:
    for function in reversed(FUNCTIONS):
        drop(function)
