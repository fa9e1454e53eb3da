"""The KServe logger sink pairs request and response events in the database (`sink_pairs`).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sink_pairs",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(50), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("received", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("request_time", sa.Float),
        sa.Column("request_body", sa.Text),
        sa.Column("routing_key", sa.Text),
        sa.Column("response_time", sa.Float),
        sa.Column("response_body", sa.Text),
    )
    op.create_index("ix_sink_pairs_state_received", "sink_pairs", ["state", "received"])
    op.create_index("ix_sink_pairs_updated", "sink_pairs", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_sink_pairs_updated", table_name="sink_pairs")
    op.drop_index("ix_sink_pairs_state_received", table_name="sink_pairs")
    op.drop_table("sink_pairs")
