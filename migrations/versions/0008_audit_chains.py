"""audit_events: several hash chains (concurrent writers on PostgreSQL)

Revision ID: 0008_audit_chains
Revises: 0007_webhook_events
Create Date: 2026-12-01 14:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_audit_chains"
down_revision: str | None = "0007_webhook_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every event written so far belongs to chain 0, the single chain it was.
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("chain", sa.SmallInteger(), server_default="0", nullable=False))
        batch.create_index("ix_audit_events_chain_id", ["chain", "id"])


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_index("ix_audit_events_chain_id")
        batch.drop_column("chain")
