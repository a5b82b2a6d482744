"""aggregator_predictions: superseded by a re-score (issue 27): which version replaced it and why

Revision ID: 4d7a1c9e2b60
Revises: 9c4d2e7f1a30
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4d7a1c9e2b60"
down_revision: str | None = "9c4d2e7f1a30"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aggregator_predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("superseded_by", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("superseded_reason", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("aggregator_predictions", schema=None) as batch_op:
        batch_op.drop_column("superseded_reason")
        batch_op.drop_column("superseded_by")
