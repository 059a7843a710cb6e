"""retries count against the per-minute limit: when a transcription was last retried

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "transcriptions", sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_transcriptions_retried",
        "transcriptions",
        ["api_key_id", "retried_at"],
        postgresql_where=sa.text("retried_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_transcriptions_retried", table_name="transcriptions")
    op.drop_column("transcriptions", "retried_at")
