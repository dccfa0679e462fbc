"""Real components for tests, shared by every layer: PostgreSQL, S3 (moto), a live service.

The pieces a benchmark deployment uses too live in :mod:`bench.harness` and are imported from
there: free ports, uniquely named PostgreSQL databases (:class:`PostgresServer`, on the server
at ``SLIM_TEST_PG_ADMIN_URL``, default postgres@127.0.0.1:5432), the service under a real
uvicorn in a thread (:class:`LiveServer`), and the API steps (:func:`push_dir`,
:func:`make_base`, :func:`make_checkpoint`, :func:`commit_and_wait`, :func:`wait_job`).

Here are only what tests alone need: the test admin key, a migrated :class:`Database`, an S3
store on a fresh bucket with small parts (:func:`make_s3_store`; moto's server is started by
the ``s3_endpoint`` fixture in ``tests/conftest.py``), small synthetic checkpoints
(:func:`tiny_model`) and API keys written straight into the database.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.harness import (
    PG_ADMIN_URL,
    S3_CREDENTIALS,
    LiveServer,
    PostgresServer,
    commit_and_wait,
    file_chunks,
    free_port,
    make_base,
    make_checkpoint,
    push_dir,
    wait_job,
)
from core.safetensors_io import save_file
from storage.blobstore import S3BlobStore
from storage.s3_store import MIN_PART_SIZE

__all__ = [
    "AUTH_HEADERS",
    "PG_ADMIN_URL",
    "S3_CREDENTIALS",
    "TEST_ADMIN_KEY",
    "TINY_SHAPES",
    "Database",
    "LiveServer",
    "PostgresServer",
    "add_api_key",
    "commit_and_wait",
    "file_chunks",
    "free_port",
    "make_base",
    "make_checkpoint",
    "make_s3_store",
    "push_dir",
    "tiny_finetune",
    "tiny_model",
    "tiny_tensors",
    "wait_job",
]

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


# -- API keys --------------------------------------------------------------------------------------


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
