"""A lease finds the keys another batch holds with an index lookup, not a scan of the whole queue.

A lease leaves out the candidate keys that have a live lease on another queue row (one batch per
key at a time). The queue has had no index on ``key`` since 0010 (every captured key paid for it),
so that check scanned every queued item of the embedding, once per batch: 4 ms at 10,000 queued
items, 14 ms at 100,000 and 105 ms at 1,000,000, where draining a backlog spent as long leasing as
embedding.

A partial index on the rows that carry a lease (batches in flight, and leases that expired and
were not yet taken over) stays as small as the work in flight. Queuing a change adds nothing to it;
leasing and releasing items now updates it (a lease's row update is no longer HOT).

The queue is written by workers and commands only, never by the application's statements (their
capture writes ``vectorsync.changes``), so building the index blocks no application write.

Revision ID: 0024_queue_leased_key
Revises: 0023_capture_one_row
"""

from alembic import op

revision = "0024_queue_leased_key"
down_revision = "0023_capture_one_row"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS queue_leased_key ON vectorsync.queue (embedding, key) "
        "WHERE leased_until IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS vectorsync.queue_leased_key")
