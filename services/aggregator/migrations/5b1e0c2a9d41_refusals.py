"""refusals: images ingest refused, counted instead of dead-lettered

Revision ID: 5b1e0c2a9d41
Revises: cf76687a7681
Create Date: 2026-11-30 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b1e0c2a9d41"
down_revision: str | None = "cf76687a7681"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "aggregator_refusals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("dicom_status", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aggregator_refusals")),
        sa.UniqueConstraint("sop_uid", "reason_code", name=op.f("uq_aggregator_refusals_sop_uid")),
    )
    with op.batch_alter_table("aggregator_refusals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_aggregator_refusals_reason_code"), ["reason_code"], unique=False)
        batch_op.create_index(batch_op.f("ix_aggregator_refusals_received_at"), ["received_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("aggregator_refusals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_aggregator_refusals_received_at"))
        batch_op.drop_index(batch_op.f("ix_aggregator_refusals_reason_code"))
    op.drop_table("aggregator_refusals")
