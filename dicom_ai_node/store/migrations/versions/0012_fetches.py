"""fetches: studies asked for with `dicom-ai-node fetch`, retrieved from a peer by C-MOVE

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fetches',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('peer', sa.String(length=64), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('accession_number', sa.String(length=64), nullable=True),
        sa.Column('study_date', sa.String(length=8), nullable=True),
        sa.Column('modalities', sa.String(length=64), nullable=True),
        sa.Column('expected_instances', sa.Integer(), nullable=True),
        sa.Column('asked', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=True),
        sa.Column('failed', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('requested_at', sa.DateTime(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('fetches', schema=None) as batch_op:
        batch_op.create_index('ix_fetches_state', ['state'], unique=False)
        batch_op.create_index('ix_fetches_study_instance_uid', ['study_instance_uid'], unique=False)


def downgrade() -> None:
    op.drop_table('fetches')
