"""Write transactions that do not deadlock on SQLite.

On SQLite (WAL) a transaction that reads first and writes later fails at once with
"database is locked" if another connection wrote in between: its snapshot is stale and SQLite
cannot wait its way out. Beginning every transaction that will write with ``BEGIN IMMEDIATE``
takes the write lock up front (waiting up to the busy timeout instead). On PostgreSQL this is
a no-op. The API and the worker both use it.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from storage.db import SQLITE_BEGIN, is_sqlite


def begin_write(session: Session) -> Session:
    """Start the session's next transaction as a write transaction (call before any query)."""
    if session.in_transaction():
        session.commit()
    if is_sqlite(session):
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
    return session
