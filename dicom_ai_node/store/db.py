"""Database engine and migrations (SQLite with WAL by default, PostgreSQL in production)."""

from __future__ import annotations

import shlex
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from dicom_ai_node.errors import NodeError

MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseNotReady(NodeError):
    """The database is unreachable or its schema is not at the current migration."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":  # the file and its folder are made by `upgrade` only
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":  # psycopg 3 is the driver we ship
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=10)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, which is what Success to a C-STORE promises.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _alembic_config(engine: Engine) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    assert head is not None, "the package ships at least one migration"
    return head


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise DatabaseNotReady(f"cannot reach the database: {exc.orig}") from None


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest migration; returns (before, after)."""
    database = _sqlite_file(engine)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    before = current_revision(engine)
    command.upgrade(_alembic_config(engine), "head")
    return before, head_revision()


def _sqlite_file(engine: Engine) -> Path | None:
    """The file of an SQLite database (None for PostgreSQL or an in-memory database)."""
    database = engine.url.database
    if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database)


def require_current_schema(engine: Engine, config_path: Path | None = None) -> None:
    """Raise DatabaseNotReady unless the schema is current; an SQLite file that does not exist is not created.

    `config_path`, the configuration file in use, goes into the command the message suggests.
    """
    upgrade_command = "dicom-ai-node db upgrade" + (f" --config {shlex.quote(str(config_path))}" if config_path else "")
    database = _sqlite_file(engine)
    if database is not None and not database.exists():
        raise DatabaseNotReady(f"the database {database} does not exist yet; run: {upgrade_command}")
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no schema yet" if current is None else f"is at migration {current}, the node needs {head}"
        raise DatabaseNotReady(f"the database {state}; run: {upgrade_command}")
