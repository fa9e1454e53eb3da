"""No index on the predictions' routing-key hash: 0004's index had no reader.

A data-subject request (subjects.py) matches the hash OR the key's pseudonym anywhere in the logged inputs, a
substring search no index serves, so SQLite and PostgreSQL scan the table for it whatever the hash's index. Keeping
that index up cost SQLite ~10 µs a logged row (random 16-hex-digit keys: a different index page for almost every
row of a batch), on the core the gateway shares with its log writer.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEX = "ix_predictions_routing_key_hash"


def upgrade() -> None:
    if _INDEX in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("predictions")}:
        op.drop_index(_INDEX, table_name="predictions")


def downgrade() -> None:
    op.create_index(_INDEX, "predictions", ["routing_key_hash"])
