"""Experiments (A/B/n): `routes.arms`, an experiment route's arms, and `predictions.cpu_ms`, the CPU time of a
model call per row, the resource metric an experiment analyses like latency.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates the tables from storage.py as it is now, which already has the columns on a new database.
    bind = op.get_bind()
    if "arms" not in {c["name"] for c in sa.inspect(bind).get_columns("routes")}:
        op.add_column("routes", sa.Column("arms", sa.JSON))
    if "cpu_ms" not in {c["name"] for c in sa.inspect(bind).get_columns("predictions")}:
        op.add_column("predictions", sa.Column("cpu_ms", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("cpu_ms")
    with op.batch_alter_table("routes") as batch:
        batch.drop_column("arms")
