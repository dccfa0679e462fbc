"""Engines, sessions and write transactions (the schema itself: :mod:`migrations.api`).

``make_engine`` tunes the two supported databases:

- SQLite (embedded mode): WAL journal, foreign keys ON, a busy timeout, and SQLAlchemy (not
  the sqlite3 driver) emitting ``BEGIN`` so that transactions, savepoints and DDL behave;
  :func:`begin_write` starts a write transaction up front (``BEGIN IMMEDIATE``).
- PostgreSQL (distributed mode): ``pool_pre_ping`` so connections dropped by a restart are
  replaced instead of failing a request.

Write transactions: on SQLite (WAL) a transaction that reads first and writes later fails at
once with "database is locked" if another connection wrote in between: its snapshot is stale
and SQLite cannot wait its way out. Every transaction that will write therefore begins with
:func:`begin_write` (or runs inside :func:`write_transaction`), which takes the write lock up
front, waiting up to the busy timeout instead. On PostgreSQL both are plain transactions.

Example:
    >>> engine = make_engine("sqlite:///slim-data/slim.db")
    >>> Session = session_factory(engine)
    >>> with Session() as session:
    ...     ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Select, create_engine, event, select
from sqlalchemy import func as sa_func
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BEGIN = "slim_sqlite_begin"
"""Execution option naming the SQLite BEGIN mode of a new transaction (DEFERRED, IMMEDIATE)."""

_T = TypeVar("_T")

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


def for_update(session: Session, stmt: Select[_T]) -> Select[_T]:
    """``stmt`` locking the rows it reads for the rest of the transaction: ``FOR UPDATE`` on
    PostgreSQL; SQLite's write transaction (:func:`begin_write`) already holds the database."""
    return stmt if is_sqlite(session) else stmt.with_for_update()


def begin_write(session: Session) -> Session:
    """Start the session's next transaction as a write transaction (call before any query).

    A transaction already open on the session is committed first. Returns the session.
    """
    if session.in_transaction():
        session.commit()
    if is_sqlite(session):
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
    return session


@contextmanager
def write_transaction(session: Session) -> Iterator[Session]:
    """A fresh write transaction (:func:`begin_write`): committed when the block ends, rolled
    back when it raises."""
    begin_write(session)
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    session.commit()
