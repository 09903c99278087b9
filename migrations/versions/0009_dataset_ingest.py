"""datasets: ingest status and error; jobs: an ingest job names a dataset, not a model

Revision ID: 0009_dataset_ingest
Revises: 0008_audit_chains
Create Date: 2026-12-01 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_dataset_ingest"
down_revision: str | None = "0008_audit_chains"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        # Every dataset that exists was ingested whole inside its request.
        batch.add_column(
            sa.Column("status", sa.String(length=16), nullable=False, server_default="ready")
        )
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("model_id", existing_type=sa.String(length=32), nullable=True)
        batch.add_column(sa.Column("dataset_id", sa.String(length=32), nullable=True))
        batch.create_index(batch.f("ix_jobs_dataset_id"), ["dataset_id"], unique=False)
        batch.create_foreign_key(
            batch.f("fk_jobs_dataset_id_datasets"),
            "datasets",
            ["dataset_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE model_id IS NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(batch.f("fk_jobs_dataset_id_datasets"), type_="foreignkey")
        batch.drop_index(batch.f("ix_jobs_dataset_id"))
        batch.drop_column("dataset_id")
        batch.alter_column("model_id", existing_type=sa.String(length=32), nullable=False)
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("error")
        batch.drop_column("status")
