"""Query functions from embedding_sql: filtered nearest neighbours (``vectorsync.nearest_where``,
``vectorsync.nearest_to_where``), the k-NN join (``vectorsync.knn_join``) and the status view
(``vectorsync.status``, ``vectorsync.embedding_status``).

Revision ID: 0004_query_functions
Revises: 0003_similarity_functions
"""

from importlib import resources

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0004_query_functions"
down_revision = "0003_similarity_functions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # exec_driver_sql: the body holds format() patterns such as %1$I that must reach Postgres as written
    execute_script(op.get_bind(), resources.files("vectorsync.embedding_sql").joinpath("sql/queries_v1.sql").read_text())


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS vectorsync.status")
    for signature in (
        "embedding_status(text)",
        "knn_join(text, text[], integer, integer, integer)",
        "_knn_join_sql(vectorsync.embeddings)",
        "nearest_to_where(text, vector, integer, jsonb, integer, integer)",
        "nearest_where(text, text, integer, jsonb, integer, integer)",
        "_embedding_of(vectorsync.embeddings, text)",
        "_search(vectorsync.embeddings, vector, integer, jsonb, text, integer, integer)",
        "_search_sql(vectorsync.embeddings, jsonb, boolean)",
        "_filter_sql(vectorsync.embeddings, jsonb, integer)",
        "_ef_search(vectorsync.embeddings, integer, integer)",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS vectorsync.{signature}")
