"""PEFT adapters through the Hub protocol's routes: pushed as a commit (small files inside it,
weights through Git LFS), stored as they are, read back by ``/resolve``.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) is already small,
so the server keeps it whole as a repository's revision (``docs/hub.md``). These helpers speak
the same routes a ``huggingface_hub`` client does — preupload, the LFS batch API (basic
transfer, signed upload URLs), the NDJSON commit, the tree and ``resolve`` — so an adapter
pushed by ``slim push`` is the one ``PeftModel.from_pretrained`` reads through ``HF_ENDPOINT``,
and the other way round. :class:`client.SlimClient` wraps them (``push_adapter``,
``list_adapters``, ``pull_adapter``, ``pull_merged``).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from client.errors import BadRequest, IntegrityError, NotFound
from client.http import Connection
from client.models import Adapter, FileInfo, NoProgress, Progress, PullReport, PushReport, Repo
from client.transfer import download, inside, quote_path, sha256_file
from core.files import CHUNK_SIZE
from core.peft_config import ADAPTER_CONFIG, MAX_CONFIG_BYTES, AdapterConfig

__all__ = [
    "GITATTRIBUTES",
    "commit_files",
    "download_files",
    "hub_files",
    "not_an_adapter",
    "read_adapter",
]

#: The first bytes of a file the preupload sees (the Hub's clients send 512).
SAMPLE_BYTES = 512
#: A file every Hub repository starts with; a push that lacks it leaves it in place.
GITATTRIBUTES = ".gitattributes"


def _path(url: str) -> str:
    """The path and query of an absolute URL the server handed out (sent to our server's URL:
    the server may know itself under another host name)."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def hub_files(conn: Connection, repo_id: str, rev: str) -> tuple[str, list[FileInfo]]:
    """The commit id ``rev`` resolves to and every file of that revision (path, size, sha256)."""
    files: list[FileInfo] = []
    cursor, commit = 0, ""
    while True:
        answer = conn.request(
            "GET",
            f"/api/models/{repo_id}/tree/{quote_path(rev)}",
            params={"recursive": "true", "cursor": cursor},
        )
        commit = answer.headers.get("x-repo-commit", commit)
        page = answer.json()
        for entry in page:
            if entry.get("type") == "file":
                sha256 = (entry.get("lfs") or {}).get("oid", "")
                files.append(FileInfo(entry["path"], int(entry["size"]), sha256))
        if 'rel="next"' not in answer.headers.get("link", ""):
            return commit, files
        cursor += len(page)


def read_adapter(conn: Connection, repo: Repo, rev: str | None = None) -> Adapter | None:
    """The adapter at revision ``rev`` (default: ``main``) of ``repo``, or None when that
    revision holds no ``adapter_config.json``."""
    repo_id = f"{repo.namespace}/{repo.name}"
    commit, files = hub_files(conn, repo_id, rev or repo.main or "main")
    if not any(f.path == ADAPTER_CONFIG for f in files):
        return None
    raw = conn.request("GET", f"/{repo_id}/resolve/{commit}/{ADAPTER_CONFIG}").content
    config = AdapterConfig.from_json(raw[:MAX_CONFIG_BYTES])
    summary = config.summary()
    return Adapter(
        name=repo.name,
        namespace=repo.namespace,
        commit_id=commit,
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=summary["target_modules"],
        modules_to_save=summary["modules_to_save"],
        task_type=config.task_type,
        base_model=config.base_model_name_or_path,
        base_id=repo.base_id,
        files=files,
    )


def commit_files(
    conn: Connection,
    repo_id: str,
    files: list[tuple[str, Path]],
    *,
    message: str,
    progress: Progress | None = None,
) -> tuple[str, PushReport]:
    """Make ``files`` the next revision of ``repo_id``'s ``main`` — exactly them, plus the
    repository's ``.gitattributes`` — as ``huggingface_hub``'s ``upload_folder`` would: ask the
    server which files go through LFS (preupload), upload those it does not hold yet, then
    commit (pinned to the head it started from: 412 if another push landed meanwhile).

    Returns:
        The commit id (the head's, unchanged, when the files are what it already holds) and
        what was sent.
    """
    bar = progress or NoProgress()
    t0 = time.perf_counter()
    head, there = hub_files(conn, repo_id, "main")
    held = {f.sha256 for f in there}
    samples = []
    for rel, path in files:
        with path.open("rb") as stream:
            sample = stream.read(SAMPLE_BYTES)
        samples.append(
            {"path": rel, "size": path.stat().st_size, "sample": base64.b64encode(sample).decode()}
        )
    modes = conn.json("POST", f"/api/models/{repo_id}/preupload/main", json={"files": samples})
    lfs = {f["path"] for f in modes["files"] if f["uploadMode"] == "lfs"}
    report = PushReport()
    lines: list[dict[str, Any]] = [
        {"key": "header", "value": {"summary": message, "description": "", "parentCommit": head}}
    ]
    todo = []
    for rel, path in files:
        if rel not in lfs:
            content = base64.b64encode(path.read_bytes()).decode()
            value = {"path": rel, "content": content, "encoding": "base64"}
            lines.append({"key": "file", "value": value})
            continue
        sha256, size = sha256_file(path), path.stat().st_size
        lines.append(
            {
                "key": "lfsFile",
                "value": {"path": rel, "algo": "sha256", "oid": sha256, "size": size},
            }
        )
        if sha256 in held:
            report.skipped.append(rel)
        else:
            todo.append((rel, path, sha256, size))
    kept = {rel for rel, _ in files} | {GITATTRIBUTES}
    for f in there:
        if f.path not in kept:
            lines.append({"key": "deletedFile", "value": {"path": f.path}})
    bar.start(f"uploading {len(todo)} file(s)", sum(size for *_, size in todo))
    try:
        for rel, path, sha256, size in todo:
            _lfs_upload(conn, repo_id, path, sha256, size, bar)
            report.sent.append(rel)
            report.bytes_sent += size
    finally:
        bar.finish()
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    answer = conn.json(
        "POST",
        f"/api/models/{repo_id}/commit/main",
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    report.seconds = time.perf_counter() - t0
    return str(answer["commitOid"]), report


def _lfs_upload(
    conn: Connection, repo_id: str, path: Path, sha256: str, size: int, bar: Progress
) -> None:
    """One object through Git LFS's batch API (basic transfer): a signed ``PUT``, then verify."""
    batch = {
        "operation": "upload",
        "transfers": ["basic"],
        "objects": [{"oid": sha256, "size": size}],
        "hash_algo": "sha256",
    }
    answer = conn.json("POST", f"/{repo_id}.git/info/lfs/objects/batch", json=batch)
    obj = answer["objects"][0]
    if "error" in obj:
        error = obj["error"]
        raise BadRequest(f"{path.name}: {error.get('message')}", code="lfs_refused")
    actions = obj.get("actions") or {}
    if "upload" in actions:

        def chunks() -> Any:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    bar.advance(len(chunk))
                    yield chunk

        conn.request(
            "PUT",
            _path(actions["upload"]["href"]),
            content=chunks(),
            headers={"Content-Length": str(size)},
        )
    if "verify" in actions:
        conn.request("POST", _path(actions["verify"]["href"]), json={"oid": sha256, "size": size})


def download_files(
    conn: Connection,
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> PullReport:
    """Every file of the adapter's revision into ``out_dir``, byte for byte (each checked
    against the sha256 the tree lists; interrupted downloads resume)."""
    bar = progress or NoProgress()
    out = Path(out_dir)
    t0 = time.perf_counter()
    report = PullReport()
    bar.start(f"pulling {adapter.name}", adapter.size)
    try:
        for f in adapter.files:
            if len(f.sha256) != 64:
                raise IntegrityError(f"the tree of {adapter.repo_id} lists no sha256 for {f.path}")
            got = download(
                conn,
                f"/{adapter.repo_id}/resolve/{adapter.commit_id}/{quote_path(f.path)}",
                inside(out, f.path),
                rel=f.path,
                size=f.size,
                sha256=f.sha256,
                progress=bar,
            )
            report.files.append(got)
            if not got.skipped:
                report.bytes_received += f.size - got.resumed_from
    finally:
        bar.finish()
    report.seconds = time.perf_counter() - t0
    return report


def not_an_adapter(name: str) -> NotFound:
    return NotFound(
        f"{name!r} holds no PEFT adapter (no {ADAPTER_CONFIG}); list adapters with "
        "`slim adapters`, checkpoints with `slim ls`"
    )
