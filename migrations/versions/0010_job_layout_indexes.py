"""lineage (model, to_version) and records (dataset, status) indexes: a job reads a
model's open lineage and the dataset's records that are not active without a scan

Revision ID: 0010_job_layout_indexes
Revises: 0009_dataset_ingest
Create Date: 2026-12-01 17:45:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_job_layout_indexes"
down_revision: str | None = "0009_dataset_ingest"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_lineage_model_to_version", "lineage", ["model_id", "to_version"])
    op.create_index("ix_records_dataset_status", "records", ["dataset_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_records_dataset_status", table_name="records")
    op.drop_index("ix_lineage_model_to_version", table_name="lineage")
