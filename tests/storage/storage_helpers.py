"""Helpers for the storage tests (imported by conftest.py and by test modules)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.blobstore import S3BlobStore
from storage.s3_store import MIN_PART_SIZE

PG_ADMIN_URL = os.environ.get(
    "SLIM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class Database:
    """A migrated database: its URL, an engine and a session factory."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """Creates and drops uniquely named databases on the test PostgreSQL server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")

    def create(self) -> str:
        name = f"slim_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def make_s3_store(endpoint: str, **kwargs: object) -> S3BlobStore:
    """An S3BlobStore on a new bucket; small parts so multipart paths are cheap to reach."""
    options: dict[str, object] = {"part_size": MIN_PART_SIZE, "retry_seconds": 5.0}
    options.update(kwargs)
    store = S3BlobStore(
        f"slim-test-{uuid.uuid4().hex[:12]}",
        endpoint,
        "us-east-1",
        S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        **options,  # type: ignore[arg-type]
    )
    store.ensure_bucket()
    return store
