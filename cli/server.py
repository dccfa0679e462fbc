"""Server verbs: ``slim serve``, ``slim worker``, ``slim migrate``, ``slim gc``, ``slim scrub``,
``slim keys create|list|revoke``.

The key and scrub verbs work on the database and blob store directly (like ``gc``): they are
for whoever runs the server, not for API clients.

All of them read their configuration from ``SLIM_*`` environment variables (see
``runtime.settings.Settings``); flags override the few that matter on a command line. They all
find the same data directory — ``--data-dir``, else ``$SLIM_DATA_DIR``, else one default per
user (``~/.local/share/slimstore``), never relative to the current directory — and each says
on stderr which database it uses. ``slim keys`` never creates a database: a key written to a
database no server reads is rejected by the server, so a missing embedded database is an error
(``no_database``) that says where the verb looked.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import asdict
from types import FrameType
from typing import Any

DATA_DIR_HELP = "local state directory (default $SLIM_DATA_DIR, else ~/.local/share/slimstore)"


class NoDatabase(Exception):
    """``slim keys`` found no database to write to (it never creates one)."""

    code = "no_database"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the API (and, unless --no-worker, a job worker) — embedded by default",
        description="Embedded default: SQLite + local blobs under the data directory "
        "(--data-dir, $SLIM_DATA_DIR, else ~/.local/share/slimstore), API and worker "
        "in one process on 127.0.0.1:8000, migrations applied at start. --workers N runs N "
        "API processes on the one port beside a supervisor that migrates and runs the job "
        "worker once. Distributed: set SLIM_DATABASE_URL and SLIM_BLOB_BACKEND=s3 "
        "(+ SLIM_S3_*) and pass --no-worker.",
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--no-worker", action="store_true", help="API only; run `slim worker` apart")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="API processes on the one port (default $SLIM_API_WORKERS, else one per two "
        "cores, capped by memory); the job worker still runs once",
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("worker", help="run a job worker (claims jobs from the database)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--worker-id", default=None, help="lease owner name (default host:pid:rand)")
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("migrate", help="create or upgrade the database schema (alembic head)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("gc", help="delete blobs nothing references (older than a grace period)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument(
        "--grace-seconds", type=float, default=None, help="default SLIM_GC_GRACE_SECONDS"
    )
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    p.set_defaults(handler=cmd_gc)

    p = sub.add_parser(
        "scrub",
        help="read back every stored blob and delta frame and check their hashes",
        description="Prints a JSON report; exits 1 when anything is missing or corrupt.",
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--no-deltas", action="store_true", help="only hash the blobs")
    p.set_defaults(handler=cmd_scrub)

    keys = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="keys_verb", metavar="ACTION", required=True
    )
    p = keys.add_parser("create", help="create a key and print it (shown once)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--role", choices=["read", "write", "admin"], default="read")
    p.add_argument("--name", default="", help="a note saying who or what the key is for")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.set_defaults(handler=cmd_keys_create)
    p = keys.add_parser("list", help="list keys (prefix, namespace, role; never the secret)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.set_defaults(handler=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key by its prefix or id (takes effect at once)")
    p.add_argument("key", help="the key's prefix (as listed) or id")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.set_defaults(handler=cmd_keys_revoke)


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from runtime.settings import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "data_dir", None):
        values["data_dir"] = args.data_dir
    return Settings(**values)


def _say_database(settings: Any, verb: str) -> None:
    """Tell (on stderr) which database and data directory a server verb uses."""
    from runtime.settings import LEGACY_DATA_DIR

    where = f"database {_redact(settings.resolved_database_url)}"
    if settings.blob_backend == "local":
        where += f", blobs {settings.resolved_blob_dir.resolve()}"
    print(f"slim {verb}: {where}", file=sys.stderr)
    legacy = LEGACY_DATA_DIR / "slim.db"
    if (
        settings.sqlite_path is not None
        and not settings.sqlite_path.exists()
        and legacy.is_file()
        and legacy.resolve() != settings.sqlite_path
    ):
        print(
            f"slim {verb}: note: {legacy.resolve()} is a database of the old default data "
            "directory (./slim-data); to keep using it pass --data-dir ./slim-data or set "
            "SLIM_DATA_DIR",
            file=sys.stderr,
        )


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _torch_threads(n: int | None) -> None:
    """Size torch's intra-op thread pool for this process (None: torch's default)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


#: glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8


def limit_malloc_arenas(n: int = 2) -> bool:
    """Let at most ``n`` malloc arenas serve this process's threads (glibc; elsewhere a
    no-op), unless ``MALLOC_ARENA_MAX`` is set. Downloads hand 8 MiB pieces between a rebuild
    thread, plane threads and the streaming thread; with an arena per thread each kept its
    own freed pieces: 0.2 B fixture through the service, API peak 488 → 401 MB with two
    arenas, pulls as fast (bench/NOTES.md, sixth sitting). Returns whether it was applied."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app

    try:
        settings = _settings(args, host=args.host, port=args.port, api_workers=args.workers)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"slim: error [invalid_settings]: {err['msg']}", file=sys.stderr)
        return 2
    _say_database(settings, "serve")
    _logging(args.log_level)
    if settings.resolved_api_workers > 1:
        return _serve_processes(settings, args)
    _torch_threads(settings.torch_threads or (1 if args.no_worker else None))
    app = create_app(settings, embedded_worker=not args.no_worker)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower())
    return 0


#: The environment variable through which ``slim serve --workers N`` tells its API processes
#: what the command line said beyond ``SLIM_*`` settings (JSON: supervisor pid, log level).
API_PROCESS_ENV = "SLIM_SERVE_API_PROCESS"
#: prctl option: the signal a process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


def _serve_processes(settings: Any, args: argparse.Namespace) -> int:
    """``slim serve --workers N``: this process is the supervisor. It migrates, makes sure an
    admin key exists (printing a generated one once), runs the embedded job worker and garbage
    collection in its own threads — once, whatever N — and lets uvicorn's supervisor run N API
    processes that accept on one listening socket (each builds :func:`api_process`'s app)."""
    import uvicorn

    from runtime.process import Background, Runtime
    from service import auth
    from service.metrics import MULTIPROCESS_ENV

    n = settings.resolved_api_workers
    _torch_threads(settings.torch_threads)  # the embedded worker's searches run here
    # The API processes read the same settings from the environment, so the command line's
    # overrides are written into it; they inherit it (spawned, not forked).
    for name in ("data_dir", "host", "port", "api_workers"):
        os.environ[f"SLIM_{name.upper()}"] = str(getattr(settings, name))
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # limit_malloc_arenas, for the children
    metrics_dir = tempfile.mkdtemp(prefix="slim-metrics-")
    os.environ[MULTIPROCESS_ENV] = metrics_dir
    os.environ[API_PROCESS_ENV] = json.dumps(
        {"supervisor_pid": os.getpid(), "log_level": args.log_level}
    )
    runtime = Runtime.from_settings(settings)  # migrations, once, before any API process
    background: Background | None = None
    try:
        first_key = auth.bootstrap(runtime)
        if first_key is not None:
            auth.announce_first_key(first_key, f"http://{settings.host}:{settings.port}")
        background = Background.start(runtime, worker=not args.no_worker, gc=True)
        print(
            f"slim serve: {n} API processes on http://{settings.host}:{settings.port}"
            + ("" if args.no_worker else ", job worker in the supervisor"),
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(
            "cli.server:api_process",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=n,
            log_level=args.log_level.lower(),
        )
    finally:
        if background is not None:
            background.stop()
        runtime.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def api_process() -> Any:
    """The app of one API process of ``slim serve --workers N`` (uvicorn calls this factory in
    each): settings from the environment the supervisor wrote, no migrations, no key
    bootstrap, no job worker, no garbage collection (the supervisor runs those once), one torch
    thread unless ``SLIM_TORCH_THREADS`` says otherwise. The process asks the kernel for
    SIGTERM when the supervisor dies, so a killed supervisor leaves no API process behind."""
    from runtime.settings import Settings
    from service.app import create_app

    spec = json.loads(os.environ[API_PROCESS_ENV])
    _die_with_parent(int(spec["supervisor_pid"]))
    limit_malloc_arenas()
    _logging(spec["log_level"])
    settings = Settings()
    _torch_threads(settings.torch_threads or 1)
    return create_app(
        settings,
        embedded_worker=False,
        gc_enabled=False,
        bootstrap=False,
        migrate_schema=False,
    )


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when ``parent`` exits (Linux prctl; elsewhere nothing), and exit
    now if it already has."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        raise SystemExit(f"slim serve: the supervisor (pid {parent}) is gone; not starting")


def cmd_worker(args: argparse.Namespace) -> int:
    from runtime.process import Runtime, make_worker
    from storage.gc import start_gc_thread

    settings = _settings(args)
    _say_database(settings, "worker")
    _logging(args.log_level)
    _torch_threads(settings.torch_threads)
    runtime = Runtime.from_settings(settings)
    worker = make_worker(runtime, worker_id=args.worker_id)
    stop = threading.Event()
    if not args.once:
        start_gc_thread(
            runtime.sessions,
            runtime.store,
            grace_seconds=settings.gc_grace_seconds,
            interval_seconds=settings.gc_interval_seconds,
            stop=stop,
            retention_seconds=settings.revision_retention_seconds,
        )

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
    from migrations.api import migrate

    settings = _settings(args)
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url)
    print(f"schema is current ({_redact(settings.resolved_database_url)})")
    if settings.sqlite_path is not None:
        print(f"slim migrate: data directory {settings.data_dir.resolve()}", file=sys.stderr)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from runtime.process import Runtime
    from storage.gc import collect_garbage

    settings = _settings(args)
    _say_database(settings, "gc")
    runtime = Runtime.from_settings(settings, migrate_schema=False)
    try:
        grace = settings.gc_grace_seconds if args.grace_seconds is None else args.grace_seconds
        report = collect_garbage(
            runtime.sessions,
            runtime.store,
            grace,
            dry_run=args.dry_run,
            retention_seconds=settings.revision_retention_seconds,
        )
    finally:
        runtime.close()
    data = asdict(report)
    data["deleted_keys"] = len(data["deleted_keys"])
    print(json.dumps(data))
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    from runtime.process import Runtime
    from storage.scrub import scrub

    settings = _settings(args)
    _say_database(settings, "scrub")
    runtime = Runtime.from_settings(settings, migrate_schema=False)
    try:
        report = scrub(runtime.sessions, runtime.store, deltas=not args.no_deltas)
    finally:
        runtime.close()
    print(json.dumps({"ok": report.ok, **asdict(report)}, indent=2))
    if not report.ok:
        print(
            f"slim: scrub found {len(report.problems)} problem(s); see the report above",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def _key_sessions(args: argparse.Namespace) -> Any:
    """An engine on the settings' database, which must exist (an embedded one is upgraded to
    the current schema when the settings migrate).

    Raises:
        NoDatabase: the embedded SQLite database does not exist.
    """
    from migrations.api import migrate
    from storage.db import make_engine

    settings = _settings(args)
    verb = f"keys {args.keys_verb}"
    _say_database(settings, verb)
    db = settings.sqlite_path
    if db is not None and not db.is_file():
        raise NoDatabase(
            f"there is no Slimstore database at {db}; `slim {verb}` writes keys to the "
            "database the server uses and never creates one. Run it with the server's "
            "--data-dir (or SLIM_DATA_DIR), or start the server once (`slim serve`, or "
            "`slim migrate` to only create the database) and run it again"
        )
    if settings.should_migrate:
        migrate(settings.resolved_database_url)
    return make_engine(settings.resolved_database_url), settings


def cmd_keys_create(args: argparse.Namespace) -> int:
    from storage.db import begin_write, session_factory
    from storage.keys import create_key

    engine, _ = _key_sessions(args)
    try:
        with session_factory(engine)() as session:
            begin_write(session)  # SQLite: take the write lock first, beside a running server
            token, row = create_key(
                session, namespace=args.namespace, role=args.role, name=args.name
            )
            session.commit()
    finally:
        engine.dispose()
    print(token)
    print(
        f"slim: created {row.role.value} key {row.key_prefix} for namespace {row.namespace!r}; "
        "it is shown only this once — send it as 'Authorization: Bearer <key>'",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from storage.db import session_factory
    from storage.keys import list_keys

    engine, _ = _key_sessions(args)
    try:
        with session_factory(engine)() as session:
            rows = [
                {
                    "prefix": r.key_prefix,
                    "id": r.id,
                    "namespace": r.namespace,
                    "role": r.role.value,
                    "name": r.name,
                    "created_at": r.created_at.isoformat(),
                    "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                }
                for r in list_keys(session, namespace=args.namespace)
            ]
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'PREFIX':<14}{'NAMESPACE':<20}{'ROLE':<7}{'STATE':<9}{'CREATED':<21}NAME")
    for r in rows:
        state = "revoked" if r["revoked_at"] else "active"
        print(
            f"{r['prefix']:<14}{r['namespace']:<20}{r['role']:<7}{state:<9}"
            f"{str(r['created_at'])[:19]:<21}{r['name']}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from storage.db import begin_write, session_factory
    from storage.keys import revoke_key

    engine, _ = _key_sessions(args)
    try:
        with session_factory(engine)() as session:
            begin_write(session)
            row = revoke_key(session, args.key)
            session.commit()
    finally:
        engine.dispose()
    print(f"revoked key {row.key_prefix} ({row.namespace}, {row.role.value})")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
