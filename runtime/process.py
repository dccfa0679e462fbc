"""The long-lived pieces a Slimstore process builds from its settings.

:class:`Runtime` holds the database engine and session factory, the blob store and the local
blob cache; :func:`make_worker` builds a :class:`worker.runner.Worker` over them. The API (see
``service.app``) and the server verbs of the CLI both start here. No FastAPI in this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from migrations.api import migrate
from runtime.settings import Settings
from storage.blobstore import BlobStore, LocalBlobStore, S3BlobStore
from storage.cache import BlobCache
from storage.db import make_engine, session_factory
from worker.runner import Worker, WorkerOptions


def make_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name (``local`` directory or ``s3`` bucket)."""
    if settings.blob_backend == "local":
        return LocalBlobStore(settings.resolved_blob_dir)
    store = S3BlobStore(
        settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key=settings.s3_access_key_id,
        secret_key=settings.s3_secret_access_key,
        prefix=settings.s3_prefix,
        retry_seconds=settings.s3_retry_seconds,
    )
    if settings.s3_create_bucket:
        store.ensure_bucket()
    return store


@dataclass
class Runtime:
    """Engine, sessions, blob store and cache of one process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: BlobStore
    cache: BlobCache

    @classmethod
    def from_settings(cls, settings: Settings, *, migrate_schema: bool | None = None) -> Runtime:
        """Connect to everything; apply migrations first when asked (default: settings)."""
        url = settings.resolved_database_url
        if settings.is_sqlite:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.should_migrate if migrate_schema is None else migrate_schema:
            migrate(url)
        engine = make_engine(url)
        store = make_blob_store(settings)
        cache = BlobCache(store, settings.resolved_cache_dir)
        return cls(settings, engine, session_factory(engine), store, cache)

    def close(self) -> None:
        self.engine.dispose()


def make_worker(
    runtime: Runtime, worker_id: str | None = None, worker_cls: type[Worker] = Worker
) -> Worker:
    """A worker over the runtime's database, store and cache, configured by its settings."""
    s = runtime.settings
    options = WorkerOptions(
        lease_seconds=s.worker_lease_seconds,
        heartbeat_seconds=s.worker_heartbeat_seconds,
        poll_seconds=s.worker_poll_seconds,
        device=s.device,
        retain_originals=s.retain_originals,
        reap_seconds=max(s.worker_lease_seconds / 4, 1.0),
    )
    return worker_cls(
        runtime.sessions,
        runtime.store,
        runtime.cache,
        s.resolved_work_dir,
        options,
        worker_id=worker_id,
    )
