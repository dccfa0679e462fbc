"""Engines, sessions and schema migrations.

``make_engine`` tunes the two supported databases:

- SQLite (embedded mode): WAL journal, foreign keys ON, a busy timeout, and SQLAlchemy (not
  the sqlite3 driver) emitting ``BEGIN`` so that transactions, savepoints and DDL behave;
  ``session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})`` starts a write
  transaction up front (the job queue claims this way).
- PostgreSQL (distributed mode): ``pool_pre_ping`` so connections dropped by a restart are
  replaced instead of failing a request.

Example:
    >>> migrate("sqlite:///slim-data/slim.db")
    >>> engine = make_engine("sqlite:///slim-data/slim.db")
    >>> Session = session_factory(engine)
    >>> with Session() as session:
    ...     ...
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy import func as sa_func
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BEGIN = "slim_sqlite_begin"
"""Execution option naming the SQLite BEGIN mode of a new transaction (DEFERRED, IMMEDIATE)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, echo: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    A bare ``postgresql://`` URL is given the psycopg (v3) driver. For a SQLite file the
    parent directory is created. Extra keyword arguments go to :func:`create_engine`.
    """
    sa_url = make_url(url)
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        engine = create_engine(sa_url, echo=echo, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(sa_url, echo=echo, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 driver; _sqlite_on_begin emits BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
    if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise ValueError(f"unknown SQLite BEGIN mode {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory; objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(engine, expire_on_commit=False)


def is_sqlite(session: Session) -> bool:
    """Whether the session is bound to SQLite."""
    return session.get_bind().dialect.name == "sqlite"


def db_now(session: Session) -> datetime:
    """The current time by the database clock (UTC, aware).

    PostgreSQL answers ``now()`` (the transaction's start time), so every worker compares
    leases against one clock; SQLite lives in this process, so its clock is ours.
    """
    if is_sqlite(session):
        return datetime.now(UTC)
    value = session.execute(select(sa_func.now())).scalar_one()
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


# -- migrations ------------------------------------------------------------------------------


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` pointing at the ``migrations`` package (no ini file)."""
    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # Passed as an attribute, not a main option, so a '%' in a password is not interpolated.
    config.attributes["url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision`` (``alembic upgrade head``)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the schema at ``url`` down to ``revision`` (``base`` drops every table)."""
    command.downgrade(alembic_config(url), revision)


def schema_is_current(engine: Engine) -> bool:
    """Whether the database is at the newest migration (for a readiness probe)."""
    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(False)))
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == set(script.get_heads())
