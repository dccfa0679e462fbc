"""The FastAPI application: ``create_app(settings)``.

Embedded mode (``slim serve``) passes ``embedded_worker=True``: a worker thread runs jobs next
to the API. Distributed mode runs the API alone (``slim serve --no-worker``) and workers as
their own processes (``slim worker``).

The storage dashboard (``/dashboard``) lives in :mod:`service.routes.dashboard`.
Access: API keys (``service.auth``); the dashboard signs in at ``/signin``.

Startup (lifespan): connect, make sure an admin key exists (``SLIM_BOOTSTRAP_KEY``, or a
generated key printed once on a fresh install), start the embedded worker and the periodic
garbage collection (``SLIM_GC_INTERVAL_SECONDS``).

API docs: ``/docs`` (Swagger UI) and ``/redoc``, assets served locally
(:mod:`service.routes.docs`).

Middleware, outermost first: metrics, request timeouts (408/504), the JSON body cap (413).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from runtime.process import Runtime, make_worker
from runtime.settings import Settings
from service import auth, errors
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import BodyLimitMiddleware, TimeoutMiddleware
from service.routes import auth as auth_routes
from service.routes import bases, checkpoints, dashboard, hub, hub_write, jobs, repos, system
from service.routes import docs as docs_routes
from storage.gc import start_gc_thread

log = logging.getLogger("slim.service")

API_DESCRIPTION = """\
Slimstore keeps fine-tuned checkpoints as sparse task-vector deltas against a base model.

Push: create a base, PUT its files, commit it; create a checkpoint of it, PUT its files,
commit it (a compression job is queued). Pull: GET each file of a ready checkpoint (rebuilt on
the fly; ETag = recorded sha256; Range honoured). Errors are `{"code", "detail"}`.

Every `/v1` route takes an API key as `Authorization: Bearer <key>` ("Authorize" above).
A base or checkpoint is named in a path (and in `base_id`, `checkpoint_id(s)`) by its id or
by its name; an id wins when both match. The walkthrough with curl is `docs/api.md`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    embedded_worker: bool = False,
    gc_enabled: bool = True,
) -> FastAPI:
    """Build the app. Connections are made at startup (lifespan), not here.

    Args:
        settings: the deployment's settings (default: from ``SLIM_*`` environment variables).
        runtime: an already built runtime to use instead (tests); not closed at shutdown.
        embedded_worker: run a job worker in a thread of this process.
        gc_enabled: run garbage collection every ``settings.gc_interval_seconds`` (0: never).
    """
    settings = settings or (runtime.settings if runtime else Settings())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = runtime is None
        rt = runtime or Runtime.from_settings(settings)
        app.state.runtime = rt
        metrics.watch_database(rt.sessions)
        first_key = await anyio.to_thread.run_sync(auth.bootstrap, rt)
        if first_key is not None:
            auth.announce_first_key(first_key, f"http://{settings.host}:{settings.port}")
        stop = threading.Event()
        thread = None
        if embedded_worker:
            worker = make_worker(rt)
            thread = threading.Thread(target=worker.run, args=(stop,), name="slim-worker")
            thread.daemon = True
            thread.start()
        gc_thread = None
        if gc_enabled:
            gc_thread = start_gc_thread(
                rt.sessions,
                rt.store,
                grace_seconds=rt.settings.gc_grace_seconds,
                interval_seconds=rt.settings.gc_interval_seconds,
                stop=stop,
                retention_seconds=rt.settings.revision_retention_seconds,
            )
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=60)
            if gc_thread is not None:
                gc_thread.join(timeout=60)
            if own:
                rt.close()

    app = FastAPI(
        title="Slimstore",
        version="1",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,  # FastAPI's pages load from a CDN; service.routes.docs serves its own
        redoc_url=None,
    )
    app.state.metrics = metrics
    errors.install(app)
    auth.install(app)
    docs_routes.install(app)
    for module in (bases, checkpoints, repos, jobs, system, auth_routes, dashboard, hub_write, hub):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_body_bytes)
    app.add_middleware(TimeoutMiddleware, timeout=settings.request_timeout_seconds)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
