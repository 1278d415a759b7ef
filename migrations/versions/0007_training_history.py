"""Model versions keep their training curve: the loss of each epoch.

Revision ID: 0007_training_history
Revises: 0006_model_checksum
"""

from alembic import op

revision = "0007_training_history"
down_revision = "0006_model_checksum"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE vectorsync.models ADD COLUMN history jsonb NOT NULL DEFAULT '[]'")


def downgrade() -> None:
    op.execute("ALTER TABLE vectorsync.models DROP COLUMN history")
