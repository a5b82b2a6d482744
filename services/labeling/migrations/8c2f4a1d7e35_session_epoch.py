"""labeling_users.session_epoch: sign-out revokes sessions server-side (issue 22, item 8)

Revision ID: 8c2f4a1d7e35
Revises: 346c6f9fb9cc
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8c2f4a1d7e35"
down_revision: str | None = "346c6f9fb9cc"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("labeling_users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("labeling_users", schema=None) as batch_op:
        batch_op.drop_column("session_epoch")
