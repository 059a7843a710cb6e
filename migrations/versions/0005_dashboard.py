"""dashboard: jobs by when they finished, and the dead ones

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_finished",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_dead", "jobs", ["finished_at"], postgresql_where=sa.text("state = 'dead'")
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_dead", table_name="jobs")
    op.drop_index("ix_jobs_finished", table_name="jobs")
