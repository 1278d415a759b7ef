"""Queue items are leased by a batch (``leased_until``) instead of row-locked for its whole length.

Revision ID: 0012_queue_leases
Revises: 0011_graph_change_capture
"""

from alembic import op

revision = "0012_queue_leases"
down_revision = "0011_graph_change_capture"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: not leased. A lease in the past has expired: its worker died or froze, the item is free.
    op.execute("ALTER TABLE vectorsync.queue ADD COLUMN leased_until timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE vectorsync.queue DROP COLUMN leased_until")
