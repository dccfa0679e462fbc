"""Helpers for the storage tests; they now live in ``tests/infra.py`` (shared by all layers)."""

from __future__ import annotations

from tests.infra import (
    PG_ADMIN_URL,
    S3_CREDENTIALS,
    Database,
    PostgresServer,
    free_port,
    make_s3_store,
)

__all__ = [
    "PG_ADMIN_URL",
    "S3_CREDENTIALS",
    "Database",
    "PostgresServer",
    "free_port",
    "make_s3_store",
]
