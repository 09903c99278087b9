"""deletion_requests: the words a feature request on a text column forgets

Revision ID: 0011_media
Revises: 0010_job_layout_indexes
Create Date: 2026-12-01 17:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_media"
down_revision: str | None = "0010_job_layout_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch:
        batch.add_column(sa.Column("tokens", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch:
        batch.drop_column("tokens")
