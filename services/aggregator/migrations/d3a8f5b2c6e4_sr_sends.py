"""aggregator_sr_sends: each frozen SR revision's delivery to each destination, with its own status,
so several PACS destinations progress independently (issue 23)

Revision ID: d3a8f5b2c6e4
Revises: 6f2b8d4e1c07
Create Date: 2026-12-07 11:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d3a8f5b2c6e4"
down_revision: str | None = "6f2b8d4e1c07"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "aggregator_sr_sends",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aggregator_sr_sends")),
        sa.UniqueConstraint("delivery_id", "destination", name=op.f("uq_aggregator_sr_sends_delivery_id")),
    )
    with op.batch_alter_table("aggregator_sr_sends", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_aggregator_sr_sends_delivery_id"), ["delivery_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_aggregator_sr_sends_destination"), ["destination"], unique=False)
        batch_op.create_index(batch_op.f("ix_aggregator_sr_sends_status"), ["status"], unique=False)
    # Frozen SRs still pending from before get their sends when the sender next runs (service.py).


def downgrade() -> None:
    with op.batch_alter_table("aggregator_sr_sends", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_aggregator_sr_sends_status"))
        batch_op.drop_index(batch_op.f("ix_aggregator_sr_sends_destination"))
        batch_op.drop_index(batch_op.f("ix_aggregator_sr_sends_delivery_id"))
    op.drop_table("aggregator_sr_sends")
