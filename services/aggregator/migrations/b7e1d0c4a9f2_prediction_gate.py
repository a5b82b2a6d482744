"""aggregator_predictions: the inference input gate's verdict, reason and score (issue 10)

Revision ID: b7e1d0c4a9f2
Revises: 5b1e0c2a9d41
Create Date: 2026-11-30 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e1d0c4a9f2"
down_revision: str | None = "5b1e0c2a9d41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aggregator_predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gate_verdict", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("gate_reason", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("gate_score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("aggregator_predictions", schema=None) as batch_op:
        batch_op.drop_column("gate_score")
        batch_op.drop_column("gate_reason")
        batch_op.drop_column("gate_verdict")
