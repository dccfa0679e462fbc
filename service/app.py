"""The FastAPI application: ``create_app(settings)``.

Embedded mode (``slim serve``) passes ``embedded_worker=True``: a worker thread runs jobs next
to the API. Distributed mode runs the API alone (``slim serve --no-worker``) and workers as
their own processes (``slim worker``).

The storage dashboard (``/dashboard``) lives in :mod:`service.routes.dashboard`.
Access: API keys (``service.auth``); the dashboard signs in at ``/signin``.

Startup (lifespan): connect, make sure an admin key exists (``SLIM_BOOTSTRAP_KEY``, or a
generated key printed once on a fresh install), start the embedded worker and the periodic
garbage collection (``SLIM_GC_INTERVAL_SECONDS``). ``slim serve --workers N`` (N > 1) does all
of that once in its supervisor and builds each API process's app with none of it
(``cli.server.api_process``).

API docs: ``/docs`` (Swagger UI) and ``/redoc``, assets served locally
(:mod:`service.routes.docs`).

Middleware, outermost first: metrics, request timeouts (408/504), the JSON body cap (413).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from runtime.process import Background, Runtime
from runtime.settings import Settings
from service import auth, errors
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import BodyLimitMiddleware, TimeoutMiddleware
from service.routes import auth as auth_routes
from service.routes import bases, checkpoints, dashboard, hub, hub_write, jobs, repos, system
from service.routes import docs as docs_routes

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
    bootstrap: bool = True,
    migrate_schema: bool | None = None,
) -> FastAPI:
    """Build the app. Connections are made at startup (lifespan), not here.

    Args:
        settings: the deployment's settings (default: from ``SLIM_*`` environment variables).
        runtime: an already built runtime to use instead (tests); not closed at shutdown.
        embedded_worker: run a job worker in a thread of this process.
        gc_enabled: run garbage collection every ``settings.gc_interval_seconds`` (0: never).
        bootstrap: make sure an admin key exists at startup (printing a generated one).
        migrate_schema: apply migrations at startup (default: ``settings.should_migrate``).
    """
    settings = settings or (runtime.settings if runtime else Settings())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = runtime is None
        rt = runtime or Runtime.from_settings(settings, migrate_schema=migrate_schema)
        app.state.runtime = rt
        metrics.watch_database(rt.sessions)
        first_key = await anyio.to_thread.run_sync(auth.bootstrap, rt) if bootstrap else None
        if first_key is not None:
            auth.announce_first_key(first_key, f"http://{settings.host}:{settings.port}")
        background = Background.start(rt, worker=embedded_worker, gc=gc_enabled)
        try:
            yield
        finally:
            background.stop()
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
