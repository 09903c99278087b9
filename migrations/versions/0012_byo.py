"""registry_mirrors: each model's mirror in an external model registry (MLflow)

Revision ID: 0012_byo
Revises: 0011_media
Create Date: 2026-12-01 17:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models.base

revision: str = "0012_byo"
down_revision: str | None = "0011_media"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_mirrors",
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", app.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("alias_version", sa.String(length=40), nullable=True),
        sa.Column("synced_at", app.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", app.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_registry_mirrors_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_registry_mirrors")),
    )
    op.create_index(
        op.f("ix_registry_mirrors_status"), "registry_mirrors", ["status"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_registry_mirrors_status"), table_name="registry_mirrors")
    op.drop_table("registry_mirrors")
