"""jobs: the destinations decided when the series was routed, so a route renamed later cannot redirect results

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destinations', sa.JSON(), nullable=True))
    # Jobs queued before stay NULL: their routes' destinations are in the configuration, not here,
    # so the worker looks the route up by name for them when they finish.


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('destinations')
