"""The tables of docs/architecture.md, "releasegate's database".

Revision ID: 0001
Revises:
"""

from alembic import op

from releasegate.storage import metadata

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The first revision creates the tables exactly as storage.py declares them; later
# revisions alter them explicitly, so storage.py stays the description of head.
_TABLES = ["routes", "predictions", "feedback", "audit", "releases", "api_keys"]


def upgrade() -> None:
    bind = op.get_bind()
    metadata.create_all(bind, tables=[metadata.tables[name] for name in _TABLES])


def downgrade() -> None:
    bind = op.get_bind()
    metadata.drop_all(bind, tables=[metadata.tables[name] for name in reversed(_TABLES)])
