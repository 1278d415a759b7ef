"""``vectorsync.nearest`` / ``nearest_to`` return k rows even when k exceeds hnsw.ef_search.

Revision ID: 0005_nearest_ef_search
Revises: 0004_query_functions
"""

from importlib import resources

from alembic import op

from vectorsync.migrations.operations import execute_script

revision = "0005_nearest_ef_search"
down_revision = "0004_query_functions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op.get_bind(), resources.files("vectorsync.embedding_sql").joinpath("sql/nearest_v2.sql").read_text())


def downgrade() -> None:
    # back to v1's bodies: re-running the v1 file would fail on its other (unchanged) functions
    script = resources.files("vectorsync.embedding_sql").joinpath("sql/similarity_v1.sql").read_text()
    for name in ("nearest", "nearest_to"):
        start = script.index(f"CREATE FUNCTION vectorsync.{name}(")
        end = script.index("$fn$;", script.index("$fn$", script.index("AS $fn$", start) + 7)) + len("$fn$;")
        execute_script(op.get_bind(), "CREATE OR REPLACE" + script[start + len("CREATE"):end])
