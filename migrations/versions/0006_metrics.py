"""metrics: failed webhook deliveries, counted at every scrape

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_failed",
        "webhook_deliveries",
        ["created_at"],
        postgresql_where=sa.text("state = 'failed'"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_failed", table_name="webhook_deliveries")
