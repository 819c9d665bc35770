"""QIDO-RS: the attributes every required matching key and return attribute needs (PS3.18 10.6.1-5, 10.6.3-x)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_STUDY_COLUMNS = (
    ('study_id', 64), ('referring_physician_name', 324), ('patient_birth_date', 64), ('patient_sex', 64),
    ('timezone_offset_from_utc', 64), ('specific_character_set', 256),
)


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        for name, length in _STUDY_COLUMNS:
            batch_op.add_column(sa.Column(name, sa.String(length=length), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_study_id'), ['study_id'], unique=False)
        batch_op.create_index('ix_studies_patient_id', ['patient_id'], unique=False)
        batch_op.create_index('ix_studies_study_date', ['study_date'], unique=False)
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('performed_procedure_step_start_date', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('performed_procedure_step_start_time', sa.String(length=64), nullable=True))
        # Rows indexed before stay NULL here: the node's start-up backfill (store/backfill.py) reads their
        # attributes from one stored file per series, then sets it.
        batch_op.add_column(sa.Column('query_attributes_indexed', sa.Boolean(), nullable=True))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        # NULL on images indexed before: QIDO-RS reads Bits Allocated from the file when it answers.
        batch_op.add_column(sa.Column('bits_allocated', sa.Integer(), nullable=True))
    op.create_table('request_attributes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('scheduled_procedure_step_id', sa.String(length=64), nullable=True),
    sa.Column('requested_procedure_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], name=op.f('fk_request_attributes_series_id_series')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_request_attributes'))
    )
    with op.batch_alter_table('request_attributes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_request_attributes_series_id'), ['series_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_request_attributes_scheduled_procedure_step_id'),
                              ['scheduled_procedure_step_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_request_attributes_requested_procedure_id'),
                              ['requested_procedure_id'], unique=False)


def downgrade() -> None:
    op.drop_table('request_attributes')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('bits_allocated')
    with op.batch_alter_table('series', schema=None) as batch_op:
        for name in ('query_attributes_indexed', 'performed_procedure_step_start_time',
                     'performed_procedure_step_start_date'):
            batch_op.drop_column(name)
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_study_date')
        batch_op.drop_index('ix_studies_patient_id')
        batch_op.drop_index(batch_op.f('ix_studies_study_id'))
        for name, _ in reversed(_STUDY_COLUMNS):
            batch_op.drop_column(name)
