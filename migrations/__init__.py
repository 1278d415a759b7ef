"""Alembic environment, revisions and operations for vectorsync's schema.

``migrations.versions`` holds the static revisions (the internal ``vectorsync`` schema and its SQL
functions); each carries the text of what it installs (``migrations.replaceable``), so a released
revision never changes. ``migrations.operations`` adds ``op.create_vectorsync_embedding`` /
``op.drop_vectorsync_embedding`` for the per-embedding objects (target table, index, triggers),
which users who run Alembic themselves can call from their own revisions.
"""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
