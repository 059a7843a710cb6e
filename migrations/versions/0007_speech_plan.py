"""speech plan: a transcribe job's speech spans, and the language detected once

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("speech", JSONB(), nullable=True))
    op.add_column(
        "transcriptions",
        sa.Column("detected_language", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("transcriptions", "detected_language")
    op.drop_column("jobs", "speech")
