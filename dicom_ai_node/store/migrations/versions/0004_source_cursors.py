"""source cursors

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('source_cursors',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('last_change', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_source_cursors'))
    )


def downgrade() -> None:
    op.drop_table('source_cursors')
