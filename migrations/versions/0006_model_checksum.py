"""Each model version records the SHA-256 of its stored bytes; workers verify it before loading.

Revision ID: 0006_model_checksum
Revises: 0005_nearest_ef_search
"""

from alembic import op

revision = "0006_model_checksum"
down_revision = "0005_nearest_ef_search"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Versions stored before this revision keep a NULL checksum: they are pickles, refused on load.
    op.execute("ALTER TABLE vectorsync.models ADD COLUMN sha256 text")


def downgrade() -> None:
    op.execute("ALTER TABLE vectorsync.models DROP COLUMN sha256")
