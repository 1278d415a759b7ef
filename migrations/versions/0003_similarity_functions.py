"""Similarity functions (``vectorsync.nearest``, ``vectorsync.nearest_to``) from vectorsync.embedding_sql.

Revision ID: 0003_similarity_functions
Revises: 0002_change_capture
"""

from importlib import resources

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0003_similarity_functions"
down_revision = "0002_change_capture"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # exec_driver_sql: the body holds format() patterns such as %1$I that must reach Postgres as written
    execute_script(op.get_bind(), resources.files("vectorsync.embedding_sql").joinpath("sql/similarity_v1.sql").read_text())


def downgrade() -> None:
    for signature in (
        "nearest_to(text, vector, integer, integer, integer)",
        "nearest(text, text, integer, integer, integer)",
        "_tune(vectorsync.embeddings, integer, integer)",
        "_operator(text)",
        "_embedding(text)",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS vectorsync.{signature}")
