"""jobs: autovacuum and autoanalyze after 1 % of the rows change, not 10-20 %

A big fan-out between autovacuum's visits leaves the planner thinking the queue is tiny,
and finished jobs' dead entries stay in ix_jobs_claimable for every claim to step over
(bench/RESULTS.md, the board's analysis). The queue table changes all the time, so it is
vacuumed and analyzed after a small share of it has.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 15:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_analyze_scale_factor = 0.01)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE jobs RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor)"
    )
