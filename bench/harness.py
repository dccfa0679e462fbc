"""Live deployments for the fault and load benchmarks, and the test suite's real components.

A :class:`Deployment` is a PostgreSQL database of its own plus either a bucket on a local S3
server (:class:`Moto`, moto's standalone server, restartable on a fixed port: it stands in for
MinIO) or a local blob directory. ``slim serve`` and ``slim worker`` run against it as real
child processes (:class:`Proc`), configured only through ``SLIM_*`` variables, so they can be
killed with SIGKILL and their peak memory read from ``/proc``. Every API starts with the
admin key :data:`ADMIN_KEY` (``SLIM_BOOTSTRAP_KEY``).

The test suite builds on the same pieces (``tests/infra.py`` imports them): free ports,
uniquely named PostgreSQL databases (:class:`PostgresServer`), the API under uvicorn in a thread
(:class:`LiveServer`), and the API steps (:func:`push_dir`, :func:`make_base`,
:func:`make_checkpoint`, :func:`commit`, :func:`wait_job`). Nothing here is imported by the
service; it only drives it from outside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.safetensors_io import save_file

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "SLIM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: The admin key every API started here bootstraps with.
ADMIN_KEY = "slim_be4c40000000_" + "b3" * 24
S3_KEY_ID = S3_SECRET = "testing"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (after {timeout:g}s)")
        time.sleep(interval)


# -- S3 ------------------------------------------------------------------------------------------


class Moto:
    """moto's S3 server in a thread of this process, on a fixed port; :meth:`stop` takes the
    endpoint down (connections refused) and :meth:`start` brings it back with its data."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None
        os.environ.setdefault("AWS_ACCESS_KEY_ID", S3_KEY_ID)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Moto:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 request
        if self._server is None:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# -- PostgreSQL ----------------------------------------------------------------------------------


def pg_ready(admin_url: str = PG_ADMIN_URL, timeout: float = 3.0) -> bool:
    url = make_url(admin_url)
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout):
            pass
    except OSError:
        return False
    engine = create_engine(url, connect_args={"connect_timeout": int(max(timeout, 1))})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


class PostgresServer:
    """Creates and drops uniquely named databases (``<prefix>_<random>``) on the PostgreSQL
    server at ``admin_url``."""

    def __init__(self, admin_url: str = PG_ADMIN_URL, *, prefix: str = "slim_test") -> None:
        self.admin_url = make_url(admin_url)
        self.prefix = prefix
        # Pre-ping: a fault test may have restarted PostgreSQL since the last use, which
        # leaves a pooled connection dead.
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)

    def create(self) -> str:
        """A new empty database; returns its URL."""
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def dispose(self) -> None:
        self.admin.dispose()


class PgDatabase:
    """A fresh, migrated database on the server at ``admin_url``; :meth:`drop` removes it."""

    def __init__(self, admin_url: str = PG_ADMIN_URL) -> None:
        from migrations.api import migrate

        self.admin_url = admin_url
        server = PostgresServer(admin_url, prefix="slim_bench")
        try:
            self.url = server.create()
        finally:
            server.dispose()
        self.name = make_url(self.url).database
        migrate(self.url)

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            server = PostgresServer(self.admin_url)
            try:
                server.drop(self.url)
            finally:
                server.dispose()


class SqliteDatabase:
    """The embedded stack's database: one SQLite file under ``root`` (the API migrates it at
    start); :meth:`drop` has nothing to do (the file goes with the deployment's directory)."""

    def __init__(self, root: Path) -> None:
        self.url = f"sqlite:///{(root / 'slim.db').resolve()}"

    def drop(self) -> None:
        pass


def pg_cluster() -> tuple[str, str]:
    """(version, name) of the local PostgreSQL cluster (Debian layout)."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    return version, "main"


def pg_ctl(action: str) -> None:
    """``pg_ctlcluster <version> main <action>`` (stop uses fast mode)."""
    version, name = pg_cluster()
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action]
    if action == "stop":
        cmd += ["-m", "fast"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def pg_always_back() -> Iterator[None]:
    """Whatever happens inside, PostgreSQL is running again afterwards (other test suites and
    agents share the server)."""
    try:
        yield
    finally:
        if not pg_ready(timeout=2):
            with contextlib.suppress(Exception):
                pg_ctl("start")
            wait_until(lambda: pg_ready(timeout=2), 120, "PostgreSQL did not come back", 0.5)


# -- a deployment and its processes ---------------------------------------------------------------


@dataclass
class Deployment:
    """Where one benchmark's metadata and blobs live; makes settings and environments."""

    root: Path
    db: PgDatabase | SqliteDatabase
    moto: Moto | None
    bucket: str = field(default_factory=lambda: f"slim-bench-{uuid.uuid4().hex[:10]}")
    blob_dir: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        s3: Moto | None,
        blob_dir: Path | None = None,
        sqlite: bool = False,
        **extra: Any,
    ) -> Deployment:
        """A deployment on PostgreSQL (a fresh database), or on a SQLite file with ``sqlite``
        (the embedded stack: then ``s3`` is normally None, blobs in a local directory)."""
        root.mkdir(parents=True, exist_ok=True)
        db = SqliteDatabase(root) if sqlite else PgDatabase()
        dep = cls(root, db, s3, blob_dir=blob_dir)
        dep.extra = {f"SLIM_{k.upper()}": str(v) for k, v in extra.items()}
        if s3 is not None:
            from storage.blobstore import S3BlobStore

            S3BlobStore(
                dep.bucket, s3.url, "us-east-1", S3_KEY_ID, S3_SECRET, retry_seconds=30
            ).ensure_bucket()
        return dep

    def env(self, data_dir: Path, **overrides: Any) -> dict[str, str]:
        """The ``SLIM_*`` environment of a ``slim`` process (own data/cache directory)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SLIM_") or k == "SLIM_BENCH_CACHE"
        }
        env |= {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "SLIM_DATABASE_URL": self.db.url,
            "SLIM_DATA_DIR": str(data_dir),
            "SLIM_BOOTSTRAP_KEY": ADMIN_KEY,
            "SLIM_GC_INTERVAL_SECONDS": "0",
            "SLIM_WORKER_POLL_SECONDS": "0.1",
            "SLIM_WORKER_HEARTBEAT_SECONDS": "0.3",
            "SLIM_WORKER_LEASE_SECONDS": "3",
        }
        if self.moto is not None:
            env |= {
                "SLIM_BLOB_BACKEND": "s3",
                "SLIM_S3_ENDPOINT_URL": self.moto.url,
                "SLIM_S3_BUCKET": self.bucket,
                "SLIM_S3_ACCESS_KEY_ID": S3_KEY_ID,
                "SLIM_S3_SECRET_ACCESS_KEY": S3_SECRET,
            }
        else:
            env["SLIM_BLOB_DIR"] = str(self.blob_dir or self.root / "blobs")
        env |= self.extra
        env |= {f"SLIM_{k.upper()}": str(v) for k, v in overrides.items()}
        return env

    def runtime(self, **overrides: Any) -> Any:
        """A :class:`runtime.process.Runtime` in this process (checks, GC, scrub)."""
        from runtime.process import Runtime
        from runtime.settings import Settings

        env = self.env(self.root / "harness", **overrides)
        values = {
            k.removeprefix("SLIM_").lower(): v
            for k, v in env.items()
            if k.startswith("SLIM_") and k != "SLIM_BENCH_CACHE"
        }
        return Runtime.from_settings(Settings(**values), migrate_schema=False)

    def close(self) -> None:
        self.db.drop()


class Proc:
    """A ``python -m cli <args>`` child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "cli", *self.args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.alive:
            assert self.popen is not None
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def peak_rss_bytes(self) -> int | None:
        """VmHWM (peak resident set) of the live process, from /proc."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Api(Proc):
    """``slim serve --no-worker`` on a fixed port (a restart comes back on the same URL)."""

    def __init__(self, dep: Deployment, name: str = "api", **overrides: Any) -> None:
        self.port = free_port()
        env = dep.env(dep.root / name, **overrides)
        args = ["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(name, [*args, "--log-level", "warning"], env, dep.root / "logs")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        super().start()
        return self

    def wait_ready(self, timeout: float = 120) -> Api:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout, f"{self.name} did not become ready", 0.2)
        return self

    def restart(self) -> Api:
        self.kill()
        return self.start().wait_ready()


def worker(dep: Deployment, name: str, **overrides: Any) -> Proc:
    """A ``slim worker`` process with its own data directory (not started)."""
    env = dep.env(dep.root / name, **overrides)
    return Proc(
        name, ["worker", "--worker-id", name, "--log-level", "warning"], env, dep.root / "logs"
    )


def client(url: str, key: str | None = ADMIN_KEY, timeout: float = 120) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


class LiveServer:
    """A real uvicorn serving ``app`` on 127.0.0.1:<free port>, in a daemon thread of this
    process (the test suite's live services)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# -- models and API steps ------------------------------------------------------------------------


def synthetic_pair(root: Path, *, params: int = 1 << 20, seed: int = 0) -> tuple[Path, Path]:
    """A base and a fine-tune of it (float32 square matrices totalling about ``params``
    parameters), with a config and a tokenizer file; returns their directories."""
    side = 512
    layers = max(1, params // (side * side))
    gen = torch.Generator().manual_seed(seed)
    base = {
        f"layer.{i}.weight": torch.randn(side, side, generator=gen) * 0.02 for i in range(layers)
    }
    base["norm.weight"] = torch.ones(side)
    ft = {}
    for name, t in base.items():
        bump = (torch.rand(t.shape, generator=gen) < 0.05) * torch.randn(t.shape, generator=gen)
        ft[name] = t + 0.001 * torch.randn(t.shape, generator=gen) + 0.02 * bump
    ft["classifier.weight"] = torch.randn(2, side, generator=gen) * 0.02
    dirs = []
    for name, tensors in (("base", base), ("ft", ft)):
        d = root / f"{name}-{seed}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "bench", "seed": seed}))
        (d / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
        dirs.append(d)
    return dirs[0], dirs[1]


def file_chunks(path: Path, size: int = 256 << 10) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _expect(r: httpx.Response, status: int, what: str) -> Any:
    """The JSON answer of ``r``; raises when it is not ``status``."""
    if r.status_code != status:
        raise RuntimeError(f"{what}: HTTP {r.status_code} (expected {status}): {r.text}")
    return r.json()


def push_dir(c: httpx.Client, kind: str, owner_id: str, directory: Path) -> list[dict[str, Any]]:
    """PUT every file under ``directory`` (streamed) to ``/v1/{kind}/{id}/files/...``; returns
    the answers."""
    answers = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        r = c.put(
            f"/v1/{kind}/{owner_id}/files/{rel}",
            content=file_chunks(path),
            headers={"content-length": str(path.stat().st_size)},
        )
        answers.append(_expect(r, 200, f"PUT {rel}"))
    return answers


def make_base(c: httpx.Client, directory: Path, name: str = "base") -> dict[str, Any]:
    """Create, push and commit a base; returns it (ready)."""
    base = _expect(c.post("/v1/bases", json={"name": name}), 201, f"create base {name}")
    push_dir(c, "bases", base["id"], directory)
    return dict(_expect(c.post(f"/v1/bases/{base['id']}/commit"), 200, f"commit base {name}"))


def make_checkpoint(
    c: httpx.Client,
    base_id: str,
    directory: Path | None,
    name: str = "ft",
    *,
    keep: float = 0.1,
    **params: Any,
) -> dict[str, Any]:
    """Create a checkpoint (method magnitude at ``keep`` unless ``params`` say otherwise) and
    push the files of ``directory`` (none when it is None)."""
    body = {"name": name, "base_id": base_id, "method": "magnitude", "keep": keep, **params}
    ckpt = _expect(c.post("/v1/checkpoints", json=body), 201, f"create checkpoint {name}")
    if directory is not None:
        push_dir(c, "checkpoints", ckpt["id"], directory)
    return dict(ckpt)


def commit(c: httpx.Client, checkpoint_id: str) -> dict[str, Any]:
    """Commit a checkpoint; returns its job (queued)."""
    r = c.post(f"/v1/checkpoints/{checkpoint_id}/commit")
    return dict(_expect(r, 202, f"commit checkpoint {checkpoint_id}"))


def wait_job(
    c: httpx.Client, job_id: str, timeout: float = 300, interval: float = 0.1
) -> dict[str, Any]:
    """Poll a job until it leaves queued/running (riding out an API restart); returns it."""

    def done() -> dict[str, Any] | None:
        try:
            job = c.get(f"/v1/jobs/{job_id}").json()
        except (httpx.TransportError, ValueError):
            return None
        return job if job.get("state") not in ("queued", "running", None) else None

    return dict(wait_until(done, timeout, f"job {job_id} did not finish", interval))


def commit_and_wait(c: httpx.Client, checkpoint_id: str, timeout: float = 300) -> dict[str, Any]:
    """Commit a checkpoint and wait for its job; returns the finished job."""
    return wait_job(c, commit(c, checkpoint_id)["id"], timeout)


def pull_sha256(c: httpx.Client, url: str) -> tuple[str, str | None, int]:
    """(sha256 of the body, ETag without quotes, bytes) of a full streamed download."""
    h = hashlib.sha256()
    n = 0
    with c.stream("GET", url) as r:
        r.raise_for_status()
        etag = r.headers.get("etag")
        for chunk in r.iter_bytes():
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), etag.strip('"') if etag else None, n


# -- a small filesystem (disk-full faults) --------------------------------------------------------


class CannotMount(RuntimeError):
    """Neither a tmpfs nor a loop-mounted ext4 image could be mounted here."""


@contextlib.contextmanager
def small_filesystem(mountpoint: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a filesystem of ``size_bytes`` at ``mountpoint`` (tmpfs, else a loop-mounted
    ext4 image); unmounted and removed afterwards. Needs root.

    Raises:
        CannotMount: mounting is not possible on this machine.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    image = mountpoint.with_suffix(".img")
    attempts = [
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mountpoint)],
    ]
    mounted = False
    for cmd in attempts:
        if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
            mounted = True
            break
    if not mounted and shutil.which("mkfs.ext4"):
        with image.open("wb") as f:
            f.truncate(max(size_bytes, 2 << 20))
        made = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, check=False
        )
        if made.returncode == 0:
            mounted = (
                subprocess.run(
                    ["mount", "-o", "loop", str(image), str(mountpoint)],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            )
    if not mounted:
        image.unlink(missing_ok=True)
        raise CannotMount("could not mount a tmpfs or a loop-mounted ext4 image (not root?)")
    try:
        yield mountpoint
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
