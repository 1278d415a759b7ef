"""Each model version records the attribute numbers of its input columns in the source table.

A model keeps the input column names it was trained with. After ``ALTER TABLE ... RENAME COLUMN``
of an input column, and the spec fixed and ``vectorsync migrate`` run, the worker maps the spec's
columns onto the model's by attribute number, so the model in service goes on embedding without a
retrain.

Versions stored before this revision get the catalogue's input attribute numbers when they are the
current version of an embedding that schema drift has not broken: such a model reads the columns
the catalogue records. Any other older version keeps NULL and is read by column name, as before.

Revision ID: 0022_model_input_attnums
Revises: 0021_large_delete_marker
"""

from alembic import op

revision = "0022_model_input_attnums"
down_revision = "0021_large_delete_marker"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE vectorsync.models ADD COLUMN input_attnums smallint[]")
    op.execute(
        "COMMENT ON COLUMN vectorsync.models.input_attnums IS "
        "'Attribute numbers in the source table of the input columns this version was trained on, in its "
        "column order; a renamed input column is still found by them. NULL: read by column name.'"
    )
    op.execute(
        "UPDATE vectorsync.models m SET input_attnums = e.input_attnums FROM vectorsync.embeddings e "
        "WHERE m.embedding = e.name AND m.version = e.current_version AND e.broken IS NULL"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE vectorsync.models DROP COLUMN input_attnums")
