"""Hybrid search: keyword ranking over a text embedding's source text fused with vector similarity.

A text embedding with ``text_search`` keeps a ``tsvector`` of its source text (the text the encoder
reads, file contents included) in a ``search`` column of each generation's table, with a GIN
index; ``vectorsync.generations.text_search`` records the text search configuration (language)
its values were made with. ``vectorsync.hybrid`` ranks the generation in service twice, by
keywords (``websearch_to_tsquery`` in that language, ``ts_rank_cd``) and by distance to the query
vector (``vectorsync._search``, so through the index), and fuses the two rankings by weighted
reciprocal rank fusion::

    score = vector_weight / (rrf_k + vector_rank) + text_weight / (rrf_k + text_rank)

A row missing from one side's ``candidates`` best gets nothing from that side; a side weighted 0
is not searched (a NULL query vector is then allowed: keywords only)::

    SELECT * FROM vectorsync.hybrid('articles', 'part ZX-4471 gasket', '[0.1, ...]', 10);

Revision ID: 0019_hybrid_search
Revises: 0018_selective_filters
"""

from alembic import op

from vectorsync.migrations.operations import execute_script
from vectorsync.migrations.replaceable import Function, create, drop

revision = "0019_hybrid_search"
down_revision = "0018_selective_filters"
branch_labels = None
depends_on = None


hybrid = Function(
    "vectorsync.hybrid",
    (
        "embedding_name text, query_text text, query vector, k integer DEFAULT 10, "
        "vector_weight double precision DEFAULT 1, text_weight double precision DEFAULT 1, "
        "rrf_k integer DEFAULT 60, candidates integer DEFAULT NULL, ef_search integer DEFAULT NULL, "
        "probes integer DEFAULT NULL"
    ),
    "TABLE (key text, score double precision, vector_rank integer, text_rank integer)",
    "LANGUAGE plpgsql VOLATILE",
    r"""
DECLARE
    e vectorsync.embeddings := vectorsync._embedding(embedding_name);
    ts_config regconfig;
    words tsquery;
    -- each side ranks this many rows: a row ranked below both sides' best can still come first
    pool integer;
    vector_keys text[];
    text_keys text[];
BEGIN
    PERFORM vectorsync._check_k(k);
    IF vector_weight IS NULL OR text_weight IS NULL OR vector_weight < 0 OR text_weight < 0
       OR vector_weight + text_weight = 0 THEN
        RAISE EXCEPTION 'vectorsync: hybrid weights must be at least 0 and not both 0, got vector_weight % and text_weight %',
            coalesce(vector_weight::text, 'NULL'), coalesce(text_weight::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rrf_k IS NULL OR rrf_k < 0 THEN
        RAISE EXCEPTION 'vectorsync: rrf_k must be at least 0, got %', coalesce(rrf_k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    pool := greatest(coalesce(candidates, greatest(4 * k, 60)), k);
    -- the generation in service, as vectorsync._embedding resolved it, and the language of its keywords
    SELECT g.text_search::regconfig INTO ts_config FROM vectorsync.generations g
     WHERE g.embedding = e.name AND g.table_schema = e.target_schema AND g.table_name = e.target_table;
    IF ts_config IS NULL THEN
        RAISE EXCEPTION 'vectorsync: embedding % has no keyword search', e.name
            USING HINT = 'set text_search = { language = "english" } in its spec (a text embedding) and run vectorsync migrate',
                  ERRCODE = 'feature_not_supported';
    END IF;
    IF vector_weight > 0 THEN
        SELECT array_agg(s.key ORDER BY s.distance, s.key) INTO vector_keys
          FROM vectorsync._search(e, query, pool, NULL, NULL, ef_search, probes) s;
    END IF;
    words := websearch_to_tsquery(ts_config, coalesce(query_text, ''));
    IF text_weight > 0 AND numnode(words) > 0 THEN
        EXECUTE format(
            'SELECT array_agg(r.key ORDER BY r.rank DESC, r.key) FROM ('
            'SELECT t.%1$I::text AS key, ts_rank_cd(t.search, $1) AS rank FROM %2$s t WHERE t.search @@ $1 '
            'ORDER BY rank DESC, t.%1$I LIMIT $2) r',
            e.key_column, vectorsync._target(e))
            INTO text_keys USING words, pool;
    END IF;
    RETURN QUERY
        SELECT coalesce(v.key, t.key),
               (coalesce(vector_weight / (rrf_k + v.rank), 0) + coalesce(text_weight / (rrf_k + t.rank), 0))::float8,
               v.rank::integer, t.rank::integer
          FROM unnest(vector_keys) WITH ORDINALITY AS v (key, rank)
          FULL JOIN unnest(text_keys) WITH ORDINALITY AS t (key, rank) ON t.key = v.key
         ORDER BY 2 DESC, least(v.rank, t.rank), 1
         LIMIT k;
END
""",
)

# text, not regconfig: pg_upgrade refuses user tables holding reg* values other than regclass/regtype/regrole
ADD_LANGUAGE = "ALTER TABLE vectorsync.generations ADD COLUMN text_search text"

DROP_KEYWORDS = r"""
DO $do$
DECLARE
    g vectorsync.generations;
BEGIN
    FOR g IN SELECT * FROM vectorsync.generations WHERE text_search IS NOT NULL LOOP
        EXECUTE format('ALTER TABLE IF EXISTS %I.%I DROP COLUMN IF EXISTS search', g.table_schema, g.table_name);
    END LOOP;
END
$do$
"""


def upgrade() -> None:
    op.execute(ADD_LANGUAGE)
    create(hybrid)


def downgrade() -> None:
    drop(hybrid)
    execute_script(op.get_bind(), DROP_KEYWORDS)
    op.execute("ALTER TABLE vectorsync.generations DROP COLUMN text_search")
