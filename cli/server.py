"""Server verbs: ``slim serve``, ``slim worker``, ``slim migrate``, ``slim gc``.

All of them read their configuration from ``SLIM_*`` environment variables (see
``service.settings.Settings``); flags override the few that matter on a command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from dataclasses import asdict
from types import FrameType
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the API (and, unless --no-worker, a job worker) — embedded by default",
        description="Embedded default: SQLite + local blobs under ./slim-data, API and worker "
        "in one process on 127.0.0.1:8000, migrations applied at start. Distributed: set "
        "SLIM_DATABASE_URL and SLIM_BLOB_BACKEND=s3 (+ SLIM_S3_*) and pass --no-worker.",
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--no-worker", action="store_true", help="API only; run `slim worker` apart")
    p.add_argument("--data-dir", default=None, help="local state directory (default ./slim-data)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("worker", help="run a job worker (claims jobs from the database)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--worker-id", default=None, help="lease owner name (default host:pid:rand)")
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("migrate", help="create or upgrade the database schema (alembic head)")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("gc", help="delete blobs nothing references (older than a grace period)")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--grace-seconds", type=float, default=None, help="default SLIM_GC_GRACE_SECONDS"
    )
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    p.set_defaults(handler=cmd_gc)


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from service.settings import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "data_dir", None):
        values["data_dir"] = args.data_dir
    return Settings(**values)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(args, host=args.host, port=args.port)
    _logging(args.log_level)
    app = create_app(settings, embedded_worker=not args.no_worker)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.runtime import Runtime, make_worker

    settings = _settings(args)
    _logging(args.log_level)
    runtime = Runtime.from_settings(settings)
    worker = make_worker(runtime, worker_id=args.worker_id)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("slim.worker").info("signal %d: finishing up", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.once:
            worker.stopping = stop
            worker.run_once()
        else:
            worker.run(stop)
    finally:
        runtime.close()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from storage.db import migrate

    settings = _settings(args)
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url)
    print(f"schema is current ({_redact(settings.resolved_database_url)})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from service.runtime import Runtime
    from storage.gc import collect_garbage

    settings = _settings(args)
    runtime = Runtime.from_settings(settings, migrate_schema=False)
    try:
        grace = settings.gc_grace_seconds if args.grace_seconds is None else args.grace_seconds
        report = collect_garbage(runtime.sessions, runtime.store, grace, dry_run=args.dry_run)
    finally:
        runtime.close()
    data = asdict(report)
    data["deleted_keys"] = len(data["deleted_keys"])
    print(json.dumps(data))
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
