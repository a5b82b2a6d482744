"""aggregator_studies.lane: fresh | backfill (issue 24): the worklist shows backfill studies behind a filter

Revision ID: a24c0f1e7b3d
Revises: 4d7a1c9e2b60
Create Date: 2026-12-07 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a24c0f1e7b3d"
down_revision: str | None = "4d7a1c9e2b60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aggregator_studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lane", sa.String(length=16), nullable=False, server_default="fresh"))
        batch_op.create_index(batch_op.f("ix_aggregator_studies_lane"), ["lane"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("aggregator_studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_aggregator_studies_lane"))
        batch_op.drop_column("lane")
