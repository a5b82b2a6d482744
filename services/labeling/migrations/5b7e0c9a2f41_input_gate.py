"""the input gate in labeling: the verdict on work tasks, refused images in labeling_skipped_images (issue 29)

Revision ID: 5b7e0c9a2f41
Revises: 8c2f4a1d7e35
Create Date: 2026-12-02 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b7e0c9a2f41"
down_revision: str | None = "8c2f4a1d7e35"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labeling_skipped_images",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=100), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=100), nullable=True),
        sa.Column("storage_uri", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("gate_check", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("gate_score", sa.Float(), nullable=True),
        sa.Column("gate_version", sa.String(length=40), nullable=False),
        sa.Column("job_key", sa.String(length=200), nullable=False),
        sa.Column("skipped_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labeling_skipped_images")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_labeling_skipped_images_sop_instance_uid")),
    )
    with op.batch_alter_table("labeling_skipped_images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_labeling_skipped_images_gate_check"), ["gate_check"], unique=False)
    with op.batch_alter_table("labeling_tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gate_verdict", sa.String(length=12), nullable=True))
        batch_op.add_column(sa.Column("gate_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("gate_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("gate_version", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labeling_tasks", schema=None) as batch_op:
        batch_op.drop_column("gate_version")
        batch_op.drop_column("gate_score")
        batch_op.drop_column("gate_reason")
        batch_op.drop_column("gate_verdict")
    with op.batch_alter_table("labeling_skipped_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_labeling_skipped_images_gate_check"))
    op.drop_table("labeling_skipped_images")
