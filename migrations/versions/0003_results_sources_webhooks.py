"""results in storage, URL sources, deduplication, webhook deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TEXT = sqlmodel.sql.sqltypes.AutoString()

# The outbox: whichever statement finishes a transcription (merge, a dead job, cancel),
# the same transaction queues its webhook and wakes the sender and anyone waiting.
ON_FINISHED_FUNCTION = """
CREATE FUNCTION scribefarm_transcription_finished() RETURNS trigger AS $$
BEGIN
    IF NEW.options ->> 'webhook_url' IS NOT NULL THEN
        INSERT INTO webhook_deliveries (transcription_id, url, status)
        VALUES (NEW.id, NEW.options ->> 'webhook_url', NEW.state);
    END IF;
    PERFORM pg_notify('scribefarm_finished', NEW.id::text);
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""
ON_FINISHED_TRIGGER = """
CREATE TRIGGER transcription_finished
AFTER UPDATE OF state ON transcriptions
FOR EACH ROW
WHEN (NEW.state IN ('succeeded', 'failed', 'canceled') AND OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION scribefarm_transcription_finished()
"""


def upgrade() -> None:
    op.alter_column("transcriptions", "source_key", existing_type=TEXT, nullable=True)
    op.alter_column("transcriptions", "source_bytes", existing_type=sa.BigInteger(), nullable=True)
    op.add_column("transcriptions", sa.Column("source_url", TEXT, nullable=True))
    op.add_column("transcriptions", sa.Column("dedup_key", TEXT, nullable=True))
    op.add_column("transcriptions", sa.Column("transcript_key", TEXT, nullable=True))
    op.add_column("transcriptions", sa.Column("transcript_bytes", sa.BigInteger(), nullable=True))
    op.add_column("transcriptions", sa.Column("transcript_sha256", TEXT, nullable=True))
    op.create_check_constraint(
        "one_source", "transcriptions", "(source_key IS NULL) <> (source_url IS NULL)"
    )
    op.create_index(
        "ix_transcriptions_dedup",
        "transcriptions",
        ["dedup_key"],
        postgresql_where=sa.text("state = 'succeeded' AND dedup_key IS NOT NULL"),
    )
    op.create_index(
        "ix_transcriptions_finished",
        "transcriptions",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("transcription_id", sa.Uuid(), nullable=False),
        sa.Column("url", TEXT, nullable=False),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("state", TEXT, server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "history",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="state_known"),
        sa.ForeignKeyConstraint(["transcription_id"], ["transcriptions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_transcription",
        "webhook_deliveries",
        ["transcription_id", "created_at"],
    )
    op.execute(ON_FINISHED_FUNCTION)
    op.execute(ON_FINISHED_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER transcription_finished ON transcriptions")
    op.execute("DROP FUNCTION scribefarm_transcription_finished()")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_transcriptions_finished", table_name="transcriptions")
    op.drop_index("ix_transcriptions_dedup", table_name="transcriptions")
    op.drop_constraint("one_source", "transcriptions", type_="check")
    for column in ("transcript_sha256", "transcript_bytes", "transcript_key", "dedup_key"):
        op.drop_column("transcriptions", column)
    op.drop_column("transcriptions", "source_url")
    op.alter_column("transcriptions", "source_bytes", existing_type=sa.BigInteger(), nullable=False)
    op.alter_column("transcriptions", "source_key", existing_type=TEXT, nullable=False)
