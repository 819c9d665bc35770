"""refused instances; jobs waiting for disk space

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('refused_instances',
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('calling_ae_title', sa.String(length=16), nullable=True),
    sa.Column('refused_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('sop_instance_uid', name=op.f('pk_refused_instances'))
    )
    with op.batch_alter_table('refused_instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_refused_instances_series_instance_uid'), ['series_instance_uid'],
                              unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('needs_free_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('needs_free_bytes')

    with op.batch_alter_table('refused_instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_refused_instances_series_instance_uid'))

    op.drop_table('refused_instances')
