"""``vectorsync.nearest`` / ``nearest_to`` return k rows even when k exceeds hnsw.ef_search.

They delegate to the filtered search with an empty filter, so they share its tuning (hnsw.ef_search
is raised to at least k; the 0003 versions returned fewer than k rows when k exceeded ef_search)
and its dimension checks.

Revision ID: 0005_nearest_ef_search
Revises: 0004_query_functions
"""

from vectorsync.migrations.replaceable import Function, replace

revision = "0005_nearest_ef_search"
down_revision = "0004_query_functions"
branch_labels = None
depends_on = None


nearest = Function(
    "vectorsync.nearest",
    (
        "embedding_name text, of_key text, k integer DEFAULT 10, ef_search integer DEFAULT NULL, "
        "probes integer DEFAULT NULL"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE sql VOLATILE",
    r"""
    SELECT * FROM vectorsync.nearest_where(embedding_name, of_key, k, '{}'::jsonb, ef_search, probes)
""",
)


nearest_to = Function(
    "vectorsync.nearest_to",
    (
        "embedding_name text, query vector, k integer DEFAULT 10, ef_search integer DEFAULT NULL, "
        "probes integer DEFAULT NULL"
    ),
    "TABLE (key text, distance double precision)",
    "LANGUAGE sql VOLATILE",
    r"""
    SELECT * FROM vectorsync.nearest_to_where(embedding_name, query, k, '{}'::jsonb, ef_search, probes)
""",
)


def upgrade() -> None:
    replace(nearest, replaces="0003_similarity_functions.nearest")
    replace(nearest_to, replaces="0003_similarity_functions.nearest_to")


def downgrade() -> None:
    replace(nearest, replace_with="0003_similarity_functions.nearest")
    replace(nearest_to, replace_with="0003_similarity_functions.nearest_to")
