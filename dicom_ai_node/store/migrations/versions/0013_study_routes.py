"""study routes: a study's series by role for models that read several series, and the roles of a job

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'study_routes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('route', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('inputs', sa.JSON(none_as_null=True), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('runs', sa.Integer(), nullable=False),
        sa.Column('opened_at', sa.DateTime(), nullable=False),
        sa.Column('decided_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_study_routes_study_id_studies')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_study_routes')),
        sa.UniqueConstraint('study_id', 'route', name=op.f('uq_study_routes_study_id')),
    )
    op.create_index(op.f('ix_study_routes_state'), 'study_routes', ['state'], unique=False)
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('inputs', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('inputs')
    op.drop_index(op.f('ix_study_routes_state'), table_name='study_routes')
    op.drop_table('study_routes')
