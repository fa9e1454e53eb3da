"""`predictions.key_id`: the API key whose request made the model call.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates the tables from storage.py as it is now, which already has the column on a new database.
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("predictions")}
    if "key_id" not in columns:
        op.add_column("predictions", sa.Column("key_id", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("key_id")
