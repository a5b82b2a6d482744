"""aggregator_sr_deliveries: one SR chain per study (issue 23): the revision's flag and
verification, its settle deadline, the frozen SR bytes and its predecessor

Revision ID: 9c4d2e7f1a30
Revises: 3e9a6b2c5d18
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9c4d2e7f1a30"
down_revision: str | None = "3e9a6b2c5d18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aggregator_sr_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flag", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("verified", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("dataset", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("predecessor_sop_uid", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("aggregator_sr_deliveries", schema=None) as batch_op:
        for column in ("predecessor_sop_uid", "dataset", "due_at", "created_at", "verified", "flag"):
            batch_op.drop_column(column)
