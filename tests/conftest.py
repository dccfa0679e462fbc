"""Fixtures every layer shares: the PostgreSQL server, the moto S3 server, live services.

- ``postgres``: the server at ``SLIM_TEST_PG_ADMIN_URL`` (tests needing it are skipped when it
  is unreachable); ``pg_url``: a fresh migrated database per test, dropped afterwards.
- ``s3_endpoint``: moto's standalone S3 server on a free loopback port (one per session).
- ``embedded`` / ``distributed`` / ``stack`` (both): a live Slimstore service — see
  :class:`Stack`. Every service starts with ``SLIM_BOOTSTRAP_KEY`` =
  :data:`tests.infra.TEST_ADMIN_KEY` and ``Stack.client`` sends it (``Stack.anonymous`` sends
  nothing); :meth:`Stack.client_for` makes a client for another key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from bench.harness import Moto
from migrations.api import migrate
from runtime.process import Runtime, make_worker
from runtime.settings import Settings
from service.app import create_app
from storage.db import make_engine
from storage.models import Model
from tests.infra import (
    AUTH_HEADERS,
    PG_ADMIN_URL,
    S3_CREDENTIALS,
    TEST_ADMIN_KEY,
    LiveServer,
    PostgresServer,
    add_api_key,
    tiny_finetune,
    tiny_model,
    tiny_tensors,
)
from worker.runner import Worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(PG_ADMIN_URL)
    try:
        with server.admin.connect():
            pass
    except OperationalError as exc:
        server.admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.orig}")
    yield server
    server.admin.dispose()


@pytest.fixture(scope="session")
def pg_session_url(postgres: PostgresServer) -> Iterator[str]:
    url = postgres.create()
    migrate(url)
    yield url
    postgres.drop(url)


@pytest.fixture
def pg_url(pg_session_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database (one per session), emptied after each test."""
    yield pg_session_url
    engine = make_engine(pg_session_url)
    tables = ", ".join(table.name for table in Model.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server running in this process (a real HTTP server)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_CREDENTIALS.items():
            mp.setenv(name, value)
        server = Moto().start()
        yield server.url
        server.stop()


# -- live services -------------------------------------------------------------------------------

#: Fast settings for tests: short polls, heartbeats and leases.
FAST = {
    "worker_poll_seconds": 0.05,
    "worker_heartbeat_seconds": 0.2,
    "worker_lease_seconds": 5.0,
}


@dataclass
class Stack:
    """A running service: its settings, runtime, base URL, an HTTP client, and the workers.

    ``embedded``: SQLite + local blobs + the worker thread inside the API process.
    ``distributed``: PostgreSQL + S3 (moto); the API without a worker, plus a separate
    :class:`Worker` (own engine and cache, like a ``slim worker`` process) in a thread.
    """

    kind: str
    settings: Settings
    runtime: Runtime
    url: str
    client: httpx.Client
    workers: list[Worker] = field(default_factory=list)
    anonymous: httpx.Client | None = None
    _clients: list[httpx.Client] = field(default_factory=list)

    def client_for(self, key: str | None) -> httpx.Client:
        """A client of this service sending ``key`` as Bearer (None: no key); closed at exit."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        self._clients.append(client)
        return client

    def new_key(self, namespace: str = "default", role: str = "write") -> str:
        """Create an API key directly in the database; returns it."""
        return add_api_key(self.runtime.sessions, namespace, role)


def _settings(kind: str, tmp: Path, pg: str | None, s3: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp / "api", "bootstrap_key": TEST_ADMIN_KEY, **FAST}
    if kind == "distributed":
        assert pg is not None and s3 is not None
        values |= {
            "database_url": pg,
            "blob_backend": "s3",
            "s3_endpoint_url": s3,
            "s3_bucket": f"slim-{os.urandom(6).hex()}",
            "s3_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "s3_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "s3_create_bucket": True,
            "s3_retry_seconds": 5.0,
        }
    values |= overrides
    return Settings(**values)


@contextmanager
def run_stack(
    kind: str,
    tmp: Path,
    *,
    pg: str | None = None,
    s3: str | None = None,
    workers: int = 1,
    **overrides: Any,
) -> Iterator[Stack]:
    """Start a live service of ``kind`` with ``workers`` job workers (0 for none)."""
    settings = _settings(kind, tmp, pg, s3, **overrides)
    with ExitStack() as stack:
        runtime = Runtime.from_settings(settings, migrate_schema=settings.is_sqlite)
        stack.callback(runtime.close)
        embedded = kind == "embedded" and workers > 0
        app = create_app(settings, runtime=runtime, embedded_worker=embedded)
        server = stack.enter_context(LiveServer(app))
        client = stack.enter_context(
            httpx.Client(base_url=server.url, timeout=120, headers=AUTH_HEADERS)
        )
        result = Stack(kind, settings, runtime, server.url, client)
        result.anonymous = result.client_for(None)
        stack.callback(lambda: [c.close() for c in result._clients])
        if kind == "distributed":
            for i in range(workers):
                result.workers.append(start_worker(stack, settings, tmp / f"worker{i}"))
        yield result


def start_worker(
    stack: ExitStack,
    settings: Settings,
    data_dir: Path,
    worker_cls: type[Worker] = Worker,
    **overrides: Any,
) -> Worker:
    """A worker with its own runtime (engine, cache, scratch) in a thread, stopped on exit.

    On SQLite the worker shares the API's data directory (one database file)."""
    import threading

    update: dict[str, Any] = {"cache_dir": None, "work_dir": None, **overrides}
    if not settings.is_sqlite:
        update["data_dir"] = data_dir
    else:
        update["database_url"] = settings.resolved_database_url
        update["work_dir"] = data_dir / "work"
    own = settings.model_copy(update=update)
    runtime = Runtime.from_settings(own, migrate_schema=False)
    worker = make_worker(runtime, worker_cls=worker_cls)
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()

    def stop() -> None:
        worker.stopping.set()
        thread.join(timeout=60)
        runtime.close()

    stack.callback(stop)
    return worker


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Stack]:
    with run_stack("embedded", tmp_path) as s:
        yield s


@pytest.fixture
def distributed(tmp_path: Path, pg_url: str, s3_endpoint: str) -> Iterator[Stack]:
    with run_stack("distributed", tmp_path, pg=pg_url, s3=s3_endpoint) as s:
        yield s


@pytest.fixture(params=["embedded", "distributed"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """Each test using this runs on the embedded and on the distributed stack."""
    s: Stack = request.getfixturevalue(request.param)
    return s


# -- small synthetic checkpoints ------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    base: Path
    finetune: Path
    finetune2: Path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """A synthetic base and two fine-tunes of it (a few hundred KB each)."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_tensors(0)
    shared = {"tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\nworld\n"}
    return Models(
        base=tiny_model(root / "base", base, extra_files=shared),
        finetune=tiny_model(root / "ft", tiny_finetune(base, 1), extra_files=shared),
        finetune2=tiny_model(root / "ft2", tiny_finetune(base, 2), extra_files=shared),
    )
