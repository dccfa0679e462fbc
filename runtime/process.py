"""The long-lived pieces a Slimstore process builds from its settings.

:class:`Runtime` holds the database engine and session factory, the blob store and the local
blob cache; :func:`make_worker` builds a :class:`worker.runner.Worker` over them, and
:class:`Background` runs it (and periodic garbage collection) in threads. The API (see
``service.app``) and the server verbs of the CLI both start here. No FastAPI in this module.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from migrations.api import migrate
from runtime.settings import Settings
from storage.blobstore import BlobStore, LocalBlobStore, S3BlobStore
from storage.cache import BlobCache
from storage.db import make_engine, session_factory
from storage.gc import start_gc_thread
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


@dataclass
class Background:
    """The threads a server runs beside its API: the embedded job worker and periodic garbage
    collection. ``slim serve`` runs them in exactly one process (the API process, or with
    ``--workers`` above one the supervisor), never once per API process."""

    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls, runtime: Runtime, *, worker: bool, gc: bool) -> Background:
        """Start the embedded worker (``worker``) and garbage collection every
        ``gc_interval_seconds`` (``gc``; 0 in the settings: never)."""
        bg = cls()
        s = runtime.settings
        if worker:
            thread = threading.Thread(
                target=make_worker(runtime).run, args=(bg.stop_event,), name="slim-worker"
            )
            thread.daemon = True
            thread.start()
            bg.threads.append(thread)
        if gc:
            gc_thread = start_gc_thread(
                runtime.sessions,
                runtime.store,
                grace_seconds=s.gc_grace_seconds,
                interval_seconds=s.gc_interval_seconds,
                stop=bg.stop_event,
                retention_seconds=s.revision_retention_seconds,
            )
            if gc_thread is not None:
                bg.threads.append(gc_thread)
        return bg

    def stop(self, timeout: float = 60) -> None:
        """Ask every thread to finish (a running job is given up to ``timeout`` seconds)."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=timeout)
