"""aggregator_sr_delivery_objects: the heatmap Secondary Captures frozen with an SR revision and
sent on its association (issue 23, item 3; PT_AGGREGATOR_SEND_HEATMAP_SC)

Revision ID: 6f2b8d4e1c07
Revises: a24c0f1e7b3d
Create Date: 2026-12-07 06:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6f2b8d4e1c07"
down_revision: str | None = "a24c0f1e7b3d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "aggregator_sr_delivery_objects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("dataset", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aggregator_sr_delivery_objects")),
        sa.UniqueConstraint("delivery_id", "sop_uid", name=op.f("uq_aggregator_sr_delivery_objects_delivery_id")),
    )
    with op.batch_alter_table("aggregator_sr_delivery_objects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_aggregator_sr_delivery_objects_delivery_id"), ["delivery_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("aggregator_sr_delivery_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_aggregator_sr_delivery_objects_delivery_id"))
    op.drop_table("aggregator_sr_delivery_objects")
