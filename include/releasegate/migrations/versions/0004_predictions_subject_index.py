"""An index on the predictions' routing-key hash: a data-subject request finds a person's rows by it.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates the tables from storage.py as it is now, which had the index until 0007 dropped it: on a new
    # database this makes it on an empty table, and 0007 drops it again.
    indexes = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("predictions")}
    if "ix_predictions_routing_key_hash" not in indexes:
        op.create_index("ix_predictions_routing_key_hash", "predictions", ["routing_key_hash"])


def downgrade() -> None:
    op.drop_index("ix_predictions_routing_key_hash", table_name="predictions")
