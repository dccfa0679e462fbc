"""Alembic environment: runs migrations against ``storage.models`` metadata.

The database URL comes from ``config.attributes["url"]`` (set by ``migrations.api.migrate``),
else ``-x url=...`` on the alembic command line, else ``sqlalchemy.url`` in an ini file.
"""

from __future__ import annotations

from alembic import context

from storage.db import make_engine
from storage.models import Model

config = context.config
target_metadata = Model.metadata


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: call migrations.api.migrate(url) or pass -x url=...")
    return str(url)


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (``alembic upgrade head --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch migrations rebuild a table (copy, drop, rename); with foreign keys on,
                # dropping it would cascade into the rows that reference it. Off for this
                # connection only, set before its first transaction (a no-op inside one).
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
