"""Alembic environment for vectorsync's own history.

``vectorsync migrate`` passes an open SQLAlchemy connection in ``config.attributes["connection"]``;
the version table lives in the ``vectorsync`` schema so it never meets the user's own
``alembic_version``.
"""

from alembic import context
from sqlalchemy import text

VERSION_TABLE_SCHEMA = "vectorsync"

connection = context.config.attributes["connection"]
connection.execute(text("CREATE SCHEMA IF NOT EXISTS vectorsync"))
context.configure(
    connection=connection,
    version_table="alembic_version",
    version_table_schema=VERSION_TABLE_SCHEMA,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
