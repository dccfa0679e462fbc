"""Alembic migrations for Slimstore's schema; run them with ``migrations.api.migrate(url)``."""
