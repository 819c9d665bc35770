"""Alembic environment: runs against the engine the node hands over, never a URL from an ini file."""

from alembic import context

from dicom_ai_node.store.models import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
