"""Real components for tests, shared by every layer: PostgreSQL, S3 (moto), a live service.

- PostgreSQL: uniquely named databases on the server at ``SLIM_TEST_PG_ADMIN_URL`` (default
  postgres@127.0.0.1:5432), created and dropped by :class:`PostgresServer`.
- S3: moto's standalone server (started by the ``s3_endpoint`` fixture in ``tests/conftest.py``)
  reached by boto3 over HTTP; :func:`make_s3_store` makes a store on a fresh bucket.
- The service: :class:`LiveServer` runs the FastAPI app under a real uvicorn on a free port in
  a thread; :func:`tiny_model` writes a small synthetic checkpoint (safetensors + config).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.safetensors_io import save_file
from storage.blobstore import S3BlobStore
from storage.s3_store import MIN_PART_SIZE

PG_ADMIN_URL = os.environ.get(
    "SLIM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
#: The admin key every test service starts with (``SLIM_BOOTSTRAP_KEY``; namespace default).
TEST_ADMIN_KEY = "slim_7e57ad000000_" + "5eed" * 12
AUTH_HEADERS = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}


@dataclass
class Database:
    """A migrated database: its URL, an engine and a session factory."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """Creates and drops uniquely named databases on the test PostgreSQL server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        # Pre-ping: a fault test may have restarted PostgreSQL since the last use, which
        # leaves a pooled connection dead.
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)

    def create(self) -> str:
        name = f"slim_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def make_s3_store(endpoint: str, **kwargs: object) -> S3BlobStore:
    """An S3BlobStore on a new bucket; small parts so multipart paths are cheap to reach."""
    options: dict[str, object] = {"part_size": MIN_PART_SIZE, "retry_seconds": 5.0}
    options.update(kwargs)
    store = S3BlobStore(
        f"slim-test-{uuid.uuid4().hex[:12]}",
        endpoint,
        "us-east-1",
        S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        **options,  # type: ignore[arg-type]
    )
    store.ensure_bucket()
    return store


# -- a live service ------------------------------------------------------------------------------


class LiveServer:
    """A real uvicorn serving ``app`` on 127.0.0.1:<free port>, in a daemon thread."""

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


# -- small synthetic checkpoints -----------------------------------------------------------------

#: Tensor shapes of the synthetic base (about 0.4 MB in float32).
TINY_SHAPES: dict[str, tuple[int, ...]] = {
    "embeddings.weight": (256, 64),
    "layer.0.weight": (64, 64),
    "layer.0.bias": (64,),
    "layer.1.weight": (64, 64),
    "layer.1.bias": (64,),
    "layer.2.weight": (256, 64),
    "norm.weight": (64,),
}


def tiny_tensors(seed: int = 0, *, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Random float32 tensors of :data:`TINY_SHAPES`."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * scale for n, s in TINY_SHAPES.items()}


def tiny_model(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    config: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``extra_files``) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "tiny"}))
    for rel, data in (extra_files or {}).items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    return directory


def tiny_finetune(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """A fine-tune of ``base``: a sparse-ish nudge on every tensor plus a new head."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        nudge = torch.randn(t.shape, generator=gen) * 0.001
        big = torch.rand(t.shape, generator=gen) < 0.05
        out[name] = t + nudge + big * torch.randn(t.shape, generator=gen) * 0.02
    out["classifier.weight"] = torch.randn((2, 64), generator=gen) * 0.02
    return out


# -- API helpers ---------------------------------------------------------------------------------


def file_chunks(path: Path, size: int = 256 << 10) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def push_dir(client: httpx.Client, kind: str, owner_id: str, directory: Path) -> list[dict]:
    """PUT every file under ``directory`` (streamed) to ``/v1/{kind}/{id}/files/...``."""
    answers = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        r = client.put(
            f"/v1/{kind}/{owner_id}/files/{rel}",
            content=file_chunks(path),
            headers={"content-length": str(path.stat().st_size)},
        )
        assert r.status_code == 200, (rel, r.status_code, r.text)
        answers.append(r.json())
    return answers


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    """Poll a job until it leaves queued/running; returns its last state."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
        time.sleep(0.05)


def make_base(client: httpx.Client, directory: Path, name: str = "base") -> dict[str, Any]:
    """Create, push and commit a base; returns it (ready)."""
    base = client.post("/v1/bases", json={"name": name}).json()
    push_dir(client, "bases", base["id"], directory)
    r = client.post(f"/v1/bases/{base['id']}/commit")
    assert r.status_code == 200, r.text
    return r.json()


def make_checkpoint(
    client: httpx.Client,
    base_id: str,
    directory: Path | None,
    name: str = "ft",
    **params: Any,
) -> dict[str, Any]:
    """Create a checkpoint (method magnitude, weights evaluation by default) and push files."""
    body = {"name": name, "base_id": base_id, "method": "magnitude", "keep": 0.1, **params}
    r = client.post("/v1/checkpoints", json=body)
    assert r.status_code == 201, r.text
    ckpt = r.json()
    if directory is not None:
        push_dir(client, "checkpoints", ckpt["id"], directory)
    return ckpt


def commit_and_wait(client: httpx.Client, checkpoint_id: str) -> dict[str, Any]:
    """Commit a checkpoint, wait for its job; returns the finished job."""
    r = client.post(f"/v1/checkpoints/{checkpoint_id}/commit")
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"])


def add_api_key(sessions: Any, namespace: str = "default", role: str = "write") -> str:
    """Create an API key in the database behind ``sessions`` (a session factory); returns it.

    Takes the write lock first: on SQLite a deferred transaction's upgrade fails with
    "database is locked" while a running server or worker writes."""
    from storage.db import begin_write
    from storage.keys import create_key

    with sessions() as session:
        begin_write(session)
        token, _ = create_key(session, namespace=namespace, role=role)
        session.commit()
    return str(token)
