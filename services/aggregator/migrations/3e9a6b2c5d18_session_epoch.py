"""aggregator_users.session_epoch: sign-out revokes sessions server-side (issue 22, item 8)

Revision ID: 3e9a6b2c5d18
Revises: b7e1d0c4a9f2
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3e9a6b2c5d18"
down_revision: str | None = "b7e1d0c4a9f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aggregator_users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("aggregator_users", schema=None) as batch_op:
        batch_op.drop_column("session_epoch")
