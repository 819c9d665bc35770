"""priorities: each job's, from its route or its study's (set by an admin), so the most urgent runs first

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        # Jobs queued before are routine (1), as every job was.
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='1'))
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('priority')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('priority')
