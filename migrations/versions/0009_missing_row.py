"""Searching from a key tells a row that does not exist from a row not embedded yet.

``vectorsync.nearest(name, key)`` said "has no embedding yet" (and "run vectorsync sync") for a key
that is in no row at all; now it says there is no such row.

Revision ID: 0009_missing_row
Revises: 0008_query_safety
"""

from vectorsync.migrations.replaceable import Function, replace

revision = "0009_missing_row"
down_revision = "0008_query_safety"
branch_labels = None
depends_on = None


# The embedding of row `of_key`; an error that says whether the row is missing or not embedded yet.
_embedding_of = Function(
    "vectorsync._embedding_of",
    "e vectorsync.embeddings, of_key text",
    "vector",
    "LANGUAGE plpgsql STABLE",
    r"""
DECLARE
    q vector;
    present boolean;
BEGIN
    EXECUTE format('SELECT embedding FROM %s WHERE %I = CAST($1 AS %s)',
                   vectorsync._target(e), e.key_column, vectorsync._key_type(e))
        INTO q USING of_key;
    IF q IS NOT NULL THEN
        RETURN q;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT FROM %s WHERE %I = CAST($1 AS %s))',
                   vectorsync._source(e), e.key_column, vectorsync._key_type(e))
        INTO present USING of_key;
    IF NOT present THEN
        RAISE EXCEPTION 'vectorsync: table % has no row with % = %', vectorsync._source(e), e.key_column, of_key
            USING ERRCODE = 'no_data_found', HINT = 'check the key';
    END IF;
    RAISE EXCEPTION 'vectorsync: row % of embedding % has no embedding yet', of_key, e.name
        USING HINT = format('run vectorsync sync %s, or see why it failed: '
                            'SELECT * FROM vectorsync.failed WHERE embedding = %L', e.name, e.name);
END
""",
)


def upgrade() -> None:
    replace(_embedding_of, replaces="0008_query_safety._embedding_of")


def downgrade() -> None:
    replace(_embedding_of, replace_with="0008_query_safety._embedding_of")
