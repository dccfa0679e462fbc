"""Real components for the storage tests: PostgreSQL, SQLite, a moto S3 server.

The server fixtures (``postgres``, ``s3_endpoint``) live in ``tests/conftest.py``.

- PostgreSQL: one database per test session, named ``slim_test_<random>``, created on the
  server at ``SLIM_TEST_PG_ADMIN_URL`` (default: postgres@127.0.0.1:5432), migrated, and
  dropped at the end; tables are truncated between tests. Tests needing it are skipped when
  the server is unreachable.
- SQLite: a fresh migrated file per test.
- S3: moto's standalone server on a free local port (HTTP, real boto3 client); a fresh bucket
  per test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import text
from storage_helpers import S3_CREDENTIALS, Database, PostgresServer, make_s3_store

from migrations.api import migrate
from storage.blobstore import BlobStore, LocalBlobStore, S3BlobStore
from storage.db import make_engine, session_factory
from storage.models import Model


@pytest.fixture
def empty_pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty PostgreSQL database (no tables), dropped after the test."""
    url = postgres.create()
    yield url
    postgres.drop(url)


@pytest.fixture(scope="session")
def pg_session_database(postgres: PostgresServer) -> Iterator[Database]:
    url = postgres.create()
    try:
        migrate(url)
        engine = make_engine(url)
        yield Database(url, engine, session_factory(engine))
        engine.dispose()
    finally:
        postgres.drop(url)


@pytest.fixture
def pg_database(pg_session_database: Database) -> Iterator[Database]:
    """The session's migrated PostgreSQL database, emptied after each test."""
    yield pg_session_database
    tables = ", ".join(table.name for table in Model.metadata.sorted_tables)
    with pg_session_database.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    """A fresh migrated SQLite file."""
    url = f"sqlite:///{tmp_path / 'slim.db'}"
    migrate(url)
    engine = make_engine(url)
    yield Database(url, engine, session_factory(engine))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Database:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_database" if request.param == "sqlite" else "pg_database"
    db: Database = request.getfixturevalue(name)
    return db


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 client on the moto server, for reaching behind a store's back."""
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def s3_store(s3_endpoint: str) -> S3BlobStore:
    return make_s3_store(s3_endpoint)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> BlobStore:
    """Each test using this runs against the local store and the S3 store."""
    blob_store: BlobStore = request.getfixturevalue(f"{request.param}_store")
    return blob_store
