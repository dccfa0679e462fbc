"""The FastAPI application: ``create_app(settings)``.

Embedded mode (``slim serve``) passes ``embedded_worker=True``: a worker thread runs jobs next
to the API. Distributed mode runs the API alone (``slim serve --no-worker``) and workers as
their own processes (``slim worker``).

The storage dashboard (``/dashboard``) is built by its own module; until it lands the route
answers 404.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors
from service.metrics import Metrics, MetricsMiddleware
from service.routes import bases, checkpoints, jobs, system
from service.runtime import Runtime, make_worker
from service.settings import Settings

log = logging.getLogger("slim.service")

API_DESCRIPTION = """\
Slimstore keeps fine-tuned checkpoints as sparse task-vector deltas against a base model.

Push: create a base, PUT its files, commit it; create a checkpoint of it, PUT its files,
commit it (a compression job is queued). Pull: GET each file of a ready checkpoint (rebuilt on
the fly; ETag = recorded sha256; Range honoured). Errors are `{"code", "detail"}`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    embedded_worker: bool = False,
) -> FastAPI:
    """Build the app. Connections are made at startup (lifespan), not here.

    Args:
        settings: the deployment's settings (default: from ``SLIM_*`` environment variables).
        runtime: an already built runtime to use instead (tests); not closed at shutdown.
        embedded_worker: run a job worker in a thread of this process.
    """
    settings = settings or (runtime.settings if runtime else Settings())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = runtime is None
        rt = runtime or Runtime.from_settings(settings)
        app.state.runtime = rt
        metrics.watch_database(rt.sessions)
        stop = threading.Event()
        thread = None
        if embedded_worker:
            worker = make_worker(rt)
            thread = threading.Thread(target=worker.run, args=(stop,), name="slim-worker")
            thread.daemon = True
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=60)
            if own:
                rt.close()

    app = FastAPI(
        title="Slimstore",
        version="1",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.metrics = metrics
    errors.install(app)
    for module in (bases, checkpoints, jobs, system):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
