"""Schema migrations as functions: upgrade, downgrade, and whether a database is current.

Example:
    >>> migrate("sqlite:///slim-data/slim.db")
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` pointing at this package (no ini file)."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
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
