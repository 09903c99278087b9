"""jobs: worker heartbeat (crash safety) and batching release time

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 21:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("worker", sa.String(length=200), nullable=True))
        batch.add_column(
            sa.Column("heartbeat_at", app.models.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("not_before", app.models.base.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("not_before")
        batch.drop_column("heartbeat_at")
        batch.drop_column("worker")
