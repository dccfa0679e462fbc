"""Alembic migrations for Slimstore's schema; run them with ``storage.db.migrate(url)``."""
