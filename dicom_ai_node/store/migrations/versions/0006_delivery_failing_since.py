"""deliveries: when the current run of transient failures began (the give-up window starts there)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failing_since', sa.DateTime(), nullable=True))
    # Deliveries already failing start their window at their last attempt.
    op.execute("UPDATE deliveries SET failing_since = last_attempt_at WHERE state = 'failed'")


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('failing_since')
