"""The SDK's client: :class:`SlimClient` pushes, pulls, lists, describes and deletes bases
and checkpoints, follows jobs and merges, over one :class:`client.http.Connection`."""

from __future__ import annotations

import importlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from client.adapters import (
    GITATTRIBUTES,
    commit_files,
    download_files,
    hub_files,
    not_an_adapter,
    read_adapter,
)
from client.errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    IntegrityError,
    JobFailed,
    NotFound,
    NotReady,
    ServerError,
)
from client.files import (
    BASE_MARKER,
    INCOMPLETE,
    default_cache_dir,
    local_files,
    read_calibration,
    split_unread,
)
from client.http import Connection
from client.models import (
    Adapter,
    Base,
    Checkpoint,
    FileInfo,
    Job,
    NoProgress,
    Progress,
    PulledFile,
    PullReport,
    PushReport,
    Repo,
    Revision,
    Stats,
    build,
)
from client.transfer import (
    FollowedDownload,
    Wanted,
    download,
    download_all,
    fetch,
    inside,
    manifest_sha256,
    partial,
    quote_path,
    sha256_file,
    upload,
)
from core.params import Method
from core.peft_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig

__all__ = ["SlimClient"]

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_MIN_PREFIX = 4


def _import_all(names: tuple[str, ...]) -> None:
    """Import modules (in a helper thread: what a later step needs, loaded ahead)."""
    for name in names:
        importlib.import_module(name)


class SlimClient:
    """A Slimstore server: push, pull, list, describe, delete, follow jobs, merge.

    Args:
        url: the server (default ``$SLIM_URL`` or http://127.0.0.1:8000).
        api_key: sent as ``Authorization: Bearer`` (default ``$SLIM_API_KEY``; none if unset).
        timeout: seconds to wait for a connection or for the next bytes of an answer.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._conn = Connection(url, api_key, timeout=timeout, transport=transport)
        self.url = self._conn.url
        self.api_key = self._conn.api_key

    def __enter__(self) -> SlimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    # -- bases ---------------------------------------------------------------------------------

    def list_bases(self) -> list[Base]:
        return [build(Base, b) for b in self._conn.pages("/v1/bases")]

    def get_base(self, ref: str) -> Base:
        """A base by id, name or unique id prefix."""
        if _UUID.match(ref):
            return build(Base, self._conn.json("GET", f"/v1/bases/{ref}"))
        return _pick(self.list_bases(), ref, "base", "slim base ls")

    def base_files(self, base_id: str) -> list[FileInfo]:
        data = self._conn.json("GET", f"/v1/bases/{base_id}/files")["data"]
        return [build(FileInfo, f) for f in data]

    def push_base(
        self, directory: str | os.PathLike[str], name: str, *, progress: Progress | None = None
    ) -> tuple[Base, PushReport]:
        """Upload a base model directory and commit it (resumes an interrupted push of the same
        name; a no-op when a ready base of that name holds the same files).

        Raises:
            AlreadyExists: a ready base of that name holds other files.
        """
        files, left_out = split_unread(local_files(directory))
        existing = next((b for b in self.list_bases() if b.name == name), None)
        if existing is not None and existing.state == "ready":
            local = manifest_sha256((rel, sha256_file(p)) for rel, p in files)
            if local != existing.manifest_sha256:
                raise AlreadyExists(
                    f"base {name!r} already exists with other files; pick another --name "
                    "(or delete it with `slim base rm` once no checkpoint depends on it)"
                )
            return existing, PushReport(skipped=[rel for rel, _ in files], left_out=left_out)
        base = existing or build(Base, self._conn.json("POST", "/v1/bases", json={"name": name}))
        report = upload(self._conn, f"/v1/bases/{base.id}", files, progress)
        report.left_out = left_out
        committed = build(Base, self._conn.json("POST", f"/v1/bases/{base.id}/commit"))
        return committed, report

    def delete_base(self, ref: str) -> Base:
        """Delete a base (409 ``conflict`` while checkpoints are stored against it)."""
        base = self.get_base(ref)
        self._conn.request("DELETE", f"/v1/bases/{base.id}")
        return base

    # -- checkpoints ---------------------------------------------------------------------------

    def list_checkpoints(
        self, base: str | None = None, state: str | None = None
    ) -> list[Checkpoint]:
        params: dict[str, Any] = {}
        if base is not None:
            params["base_id"] = self.get_base(base).id
        if state is not None:
            params["state"] = state
        return [build(Checkpoint, c) for c in self._conn.pages("/v1/checkpoints", **params)]

    def get_checkpoint(self, ref: str, *, revision: str | None = None) -> Checkpoint:
        """A checkpoint (with its search trace) by id, name (its repository's ``main``) or
        unique id prefix; with ``revision``, the one holding that revision of repository
        ``ref`` (a ref name, a commit id or a prefix of at least 7 hex digits)."""
        if revision is not None:
            held = self.get_revision(ref, revision)
            if held.checkpoint_id is None:
                raise NotFound(f"{ref!r} is a base's repository; use `slim base` to read it")
            ref = held.checkpoint_id
        elif not _UUID.match(ref):
            try:
                return build(Checkpoint, self._conn.json("GET", f"/v1/checkpoints/{_segment(ref)}"))
            except NotFound:
                ref = _pick(self.list_checkpoints(), ref, "checkpoint", "slim ls").id
        return build(Checkpoint, self._conn.json("GET", f"/v1/checkpoints/{ref}"))

    def checkpoint_files(self, checkpoint_id: str) -> list[FileInfo]:
        data = self._conn.json("GET", f"/v1/checkpoints/{checkpoint_id}/files")["data"]
        return [build(FileInfo, f) for f in data]

    def delete_checkpoint(self, ref: str) -> Checkpoint:
        ckpt = self.get_checkpoint(ref)
        self._conn.request("DELETE", f"/v1/checkpoints/{ckpt.id}")
        return ckpt

    # -- repositories --------------------------------------------------------------------------

    def list_repos(self) -> list[Repo]:
        return [build(Repo, r) for r in self._conn.pages("/v1/repos")]

    def get_repo(self, name: str) -> Repo:
        return build(Repo, self._conn.json("GET", f"/v1/repos/{_segment(name)}"))

    def create_repo(
        self, name: str, *, base: str | None = None, policy: dict[str, Any] | None = None
    ) -> Repo:
        """A repository for Hub pushes: ``base`` (a repository holding a base) is what pushes
        are stored against when their model card names none; ``policy`` what they are
        compressed to (``method``, ``min_fidelity``, ``keep``, ``value_bits``,
        ``calibration_file``)."""
        body = {"name": name, "base": base, "policy": policy}
        return build(Repo, self._conn.json("POST", "/v1/repos", json=body))

    def update_repo(
        self, name: str, *, base: str | None = None, policy: dict[str, Any] | None = None
    ) -> Repo:
        """Change a repository's base or policy (fields not given stay)."""
        body = {"base": base, "policy": policy}
        return build(Repo, self._conn.json("PATCH", f"/v1/repos/{_segment(name)}", json=body))

    def list_revisions(self, name: str) -> list[Revision]:
        """A repository's revisions, newest first."""
        return [
            build(Revision, r) for r in self._conn.pages(f"/v1/repos/{_segment(name)}/revisions")
        ]

    def get_revision(self, name: str, rev: str = "main") -> Revision:
        """The revision ``rev`` names: a ref name, a full commit id or a unique prefix."""
        url = f"/v1/repos/{_segment(name)}/revisions/{_segment(rev)}"
        return build(Revision, self._conn.json("GET", url))

    def create_checkpoint(self, **body: Any) -> Checkpoint:
        return build(Checkpoint, self._conn.json("POST", "/v1/checkpoints", json=body))

    def commit(self, checkpoint_id: str) -> Job:
        """Queue the compression of an uploaded checkpoint."""
        return Job.from_json(self._conn.json("POST", f"/v1/checkpoints/{checkpoint_id}/commit"))

    def push(
        self,
        directory: str | os.PathLike[str],
        base: str,
        *,
        name: str | None = None,
        method: str | None = None,
        keep: float | None = None,
        min_fidelity: float | None = None,
        value_bits: int | None = None,
        evaluation: str | None = None,
        calibration: str | os.PathLike[str] | list[dict[str, Any]] | None = None,
        calibration_limit: int | None = None,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> tuple[Checkpoint, Job, PushReport]:
        """Upload a fine-tune of ``base`` and queue its compression.

        The server decides what a name in use means. While a push of it is in flight, the same
        base and options (after its defaults) resume it — only the files it does not hold with
        the same sha256 are sent; other options are a 409 ``options_differ`` naming them,
        unless that checkpoint failed unstored, which the new one replaces. Once the name's
        repository has a ready ``main``, the same files with the same options answer with
        that checkpoint and its latest job, and anything else becomes the repository's next
        revision (its ``commit_id`` is set once the job has stored it). Files the server
        does not read (``*.bin``, ``*.pt``, pickles: :data:`UNREAD_SUFFIXES`) are left out and
        listed in the report's ``left_out``; the server's ``warnings`` land in ``warnings``.

        Args:
            directory: the fine-tune's model directory.
            base: the base's name or id (ready).
            name: the checkpoint's name (default: the directory's name).
            method, keep, min_fidelity, value_bits, evaluation, options, seed: see the API's
                ``POST /v1/checkpoints`` (without calibration and without a lossy choice the
                server stores the checkpoint exact).
            calibration: a JSONL file (or list) of ``{"text", "label"}`` examples.
            calibration_limit: evaluate on at most this many of them (a subsample drawn by
                ``seed``; default :data:`core.params.DEFAULT_CALIBRATION_LIMIT`).

        Raises:
            AlreadyExists: a committed checkpoint of that name holds other files.
            Conflict: (``options_differ``) the name is taken with other options.
        """
        files, left_out = split_unread(local_files(directory))
        name = name or Path(directory).resolve().name
        the_base = self.get_base(base)
        if the_base.state != "ready":
            raise NotReady(
                f"base {the_base.name!r} is {the_base.state}; finish it with "
                f"`slim base push DIR --name {the_base.name}`"
            )
        body: dict[str, Any] = {"name": name, "base_id": the_base.id, "seed": seed}
        optional = {
            "method": method,
            "keep": keep,
            "min_fidelity": min_fidelity,
            "value_bits": value_bits,
            "evaluation": evaluation,
            "calibration_limit": calibration_limit,
            "options": options,
        }
        body |= {k: v for k, v in optional.items() if v is not None}
        if calibration is not None:
            body["calibration"] = (
                calibration if isinstance(calibration, list) else read_calibration(calibration)
            )
        digests: dict[str, str] | None = None
        if self._has_main(name):  # the same files again are a no-op
            digests = {rel: sha256_file(p) for rel, p in files}
            body["manifest_sha256"] = manifest_sha256(digests.items())
        answer = self._conn.json("POST", "/v1/checkpoints", json=body)
        ckpt = build(Checkpoint, answer)
        warnings = [str(w) for w in answer.get("warnings") or []]
        if ckpt.state not in ("uploading", "failed"):
            ckpt, job, report = self._same_push(ckpt, files, digests)
        else:
            report = upload(self._conn, f"/v1/checkpoints/{ckpt.id}", files, progress, digests)
            job = self.commit(ckpt.id)
            ckpt = self.get_checkpoint(ckpt.id)
        report.left_out, report.warnings = left_out, warnings
        return ckpt, job, report

    def _has_main(self, name: str) -> bool:
        try:
            return self.get_repo(name).main is not None
        except NotFound:
            return False

    def _same_push(
        self, ckpt: Checkpoint, files: list[tuple[str, Path]], digests: dict[str, str] | None
    ) -> tuple[Checkpoint, Job, PushReport]:
        remote = {f.path: f.sha256 for f in self.checkpoint_files(ckpt.id)}
        local = digests if digests is not None else {rel: sha256_file(p) for rel, p in files}
        if remote != local:
            raise AlreadyExists(
                f"checkpoint {ckpt.name!r} already exists ({ckpt.state}) with other files; pick "
                f"another --name, or delete it with `slim rm {ckpt.name}`"
            )
        jobs = self.list_jobs(checkpoint_id=ckpt.id)
        if not jobs:
            raise NotFound(f"checkpoint {ckpt.name!r} has no job; push it under a new name")
        return ckpt, jobs[0], PushReport(skipped=sorted(local))

    # -- pulls ---------------------------------------------------------------------------------

    def pull(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        progress: Progress | None = None,
        revision: str | None = None,
    ) -> PullReport:
        """Download every file of a ready checkpoint, rebuilt by the server, into ``out_dir``
        (with ``revision``: that revision of repository ``ref``, exactly its bytes).

        Files already there with the right sha256 are kept; ``<file>.incomplete`` leftovers
        of an interrupted pull are continued with ``Range``. Each file is moved into place only
        after its sha256 matched the ETag (at ``scale`` 1; other scales have no recorded hash).
        """
        ckpt = self._ready(ref, revision)
        out = Path(out_dir)
        t0 = time.perf_counter()
        files = self.checkpoint_files(ckpt.id)
        params = {} if scale == 1.0 else {"scale": repr(float(scale))}
        report = PullReport()
        bar = progress or NoProgress()
        bar.start(f"pulling {ckpt.name}", sum(f.size for f in files))
        wanted = [
            Wanted(
                f"/v1/checkpoints/{ckpt.id}/files/{quote_path(f.path)}",
                inside(out, f.path),
                f.path,
                f.size,
                f.pull_sha256 if scale == 1.0 else None,
                params,
            )
            for f in files
        ]
        try:
            report.files = download_all(self._conn, wanted, bar)
        finally:
            bar.finish()
        report.bytes_received = sum(g.size - g.resumed_from for g in report.files if not g.skipped)
        report.seconds = time.perf_counter() - t0
        return report

    def pull_local(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
        revision: str | None = None,
    ) -> PullReport:
        """Download only the checkpoint's delta and rebuild it here against a cached base.

        The base is downloaded once into ``<cache>/bases/<manifest sha256>/`` (each file
        verified by sha256) and reused by every later pull of any checkpoint of that base; the
        delta is kept under ``<cache>/deltas/<sha256>.slim``. The rebuilt files are the same
        bytes a server-side pull gives (at scale 1 each is checked against the digests recorded
        when the delta was written, and their sha256 against the server's listing). Tensors are
        rebuilt on every core while the delta downloads (each frame checked as it is read), and
        no rebuilt file is moved into place before the whole delta matched its sha256; nothing
        rebuilt is read back.
        """
        t0 = time.perf_counter()
        ckpt = self._ready(ref, revision)
        # the rebuild's modules load while the delta downloads; a lossless delta at scale 1 is
        # rebuilt without torch (seconds to import), which other deltas need for arithmetic
        arithmetic = scale != 1.0 or ckpt.method != Method.LOSSLESS
        importing = threading.Thread(
            target=_import_all,
            args=(
                ("core.reconstruct", "core.delta_apply") if arithmetic else ("core.reconstruct",),
            ),
            daemon=True,
        )
        importing.start()
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        report = PullReport(local=True)
        bar = progress or NoProgress()
        base_dir, report.base_bytes = self._cached_base(self.get_base(ckpt.base_id), cache, bar)
        delta, fetched = self._delta_fetch(ckpt, cache, bar)
        digests: dict[str, str] = {}
        try:
            importing.join()
            from core.reconstruct import reconstruct  # raises here if the import failed

            if isinstance(fetched, FollowedDownload):  # rebuilt as the delta arrives
                written = reconstruct(
                    base_dir, partial(delta), out_dir, scale=scale, digests=digests,
                    arriving=fetched,
                )  # fmt: skip
                got = fetched.result()
                os.replace(partial(delta), delta)
            else:
                bar.start(f"rebuilding {ckpt.name}", 0)
                written = reconstruct(base_dir, delta, out_dir, scale=scale, digests=digests)
                got = fetched
        except BaseException:
            if isinstance(fetched, FollowedDownload) and (error := fetched.stop()) is not None:
                raise error from None  # what stopped the download stopped the rebuild
            raise
        finally:
            bar.finish()
        report.delta_bytes = 0 if got.skipped else got.size - got.resumed_from
        out = Path(out_dir)
        listed = {f.path: f.pull_sha256 for f in self.checkpoint_files(ckpt.id)}
        for path in written:
            rel = path.relative_to(out).as_posix()
            digest = digests[rel]
            if scale == 1.0 and listed.get(rel, digest) != digest:
                path.unlink()
                raise IntegrityError(
                    f"{rel} rebuilt here has sha256 {digest}, the server records "
                    f"{listed[rel]}; the cached delta is not this checkpoint's — pull again"
                )
            report.files.append(PulledFile(rel, path.stat().st_size, digest))
        report.bytes_received = report.base_bytes + report.delta_bytes
        report.seconds = time.perf_counter() - t0
        return report

    def _ready(self, ref: str, revision: str | None = None) -> Checkpoint:
        ckpt = self.get_checkpoint(ref, revision=revision)
        if ckpt.state != "ready":
            raise NotReady(
                f"checkpoint {ckpt.name!r} is {ckpt.state}; pull it once its job has succeeded "
                f"(follow it with `slim status {ckpt.name} --follow`)"
            )
        return ckpt

    def _cached_base(self, base: Base, cache: Path, bar: Progress) -> tuple[Path, int]:
        """The base's directory in the cache, downloaded (and verified) on first use."""
        if not base.manifest_sha256:
            raise NotReady(f"base {base.name!r} is {base.state}; it has no files to pull yet")
        directory = cache / "bases" / base.manifest_sha256
        marker = directory / BASE_MARKER
        files = self.base_files(base.id)
        if marker.is_file():
            recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
            if all(
                (directory / f.path).is_file() and (directory / f.path).stat().st_size == f.size
                for f in files
            ) and {f["path"] for f in recorded} == {f.path for f in files}:
                return directory, 0
        if manifest_sha256((f.path, f.sha256) for f in files) != base.manifest_sha256:
            raise IntegrityError(
                f"the files of base {base.name!r} do not match its manifest; report this"
            )
        bar.start(f"caching base {base.name}", sum(f.size for f in files))
        wanted = [
            Wanted(
                f"/v1/bases/{base.id}/files/{quote_path(f.path)}",
                inside(directory, f.path),
                f.path,
                f.size,
                f.sha256,
            )
            for f in files
        ]
        try:
            got = download_all(self._conn, wanted, bar)
        finally:
            bar.finish()
        received = sum(g.size - g.resumed_from for g in got if not g.skipped)
        doc = {
            "base_id": base.id,
            "name": base.name,
            "server": self.url,
            "manifest_sha256": base.manifest_sha256,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        }
        tmp = marker.with_name(marker.name + INCOMPLETE)
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, marker)
        return directory, received

    def _delta_fetch(
        self, ckpt: Checkpoint, cache: Path, bar: Progress
    ) -> tuple[Path, PulledFile | FollowedDownload]:
        """The delta's place in the cache, and its download: done and checked when the delta
        was there or had to be continued from an earlier part, else still under way (only a
        fresh download is followed by the rebuild)."""
        url = f"/v1/checkpoints/{ckpt.id}/delta"
        head = self._conn.request("HEAD", url)
        etag = head.headers.get("etag", "").strip('"')
        size = int(head.headers.get("content-length", ckpt.stored_bytes or 0))
        if not re.fullmatch(r"[0-9a-f]{64}", etag):
            raise ServerError(f"the delta of {ckpt.name!r} came without a sha256 ETag")
        target = cache / "deltas" / f"{etag}.slim"
        if target.is_file() or partial(target).exists():
            bar.start(f"fetching delta of {ckpt.name}", size)
            try:
                got = download(self._conn, url, target, size=size, sha256=etag, progress=bar)
            finally:
                bar.finish()
            return target, got
        bar.start(f"fetching and rebuilding {ckpt.name}", size)
        follow = FollowedDownload(
            lambda landed: fetch(
                self._conn, url, target, size=size, sha256=etag, progress=bar, landed=landed
            ),
            size,
        )
        return target, follow

    # -- PEFT adapters -------------------------------------------------------------------------

    def push_adapter(
        self,
        directory: str | os.PathLike[str],
        name: str | None = None,
        *,
        base: str | None = None,
        progress: Progress | None = None,
    ) -> tuple[Adapter, PushReport]:
        """Store a PEFT adapter directory as it is, as the next revision of repository
        ``name`` (created if missing), through the Hub protocol's routes (:mod:`client.adapters`).

        The revision holds exactly the directory's files (and the repository's
        ``.gitattributes``); files the server already holds are not sent again. The base
        recorded with the repository — what :meth:`pull_merged` merges into — is ``base`` (a
        repository here holding a base), else ``adapter_config.json``'s
        ``base_model_name_or_path`` when that names one; else none is recorded.

        Raises:
            InvalidAdapter: ``adapter_config.json`` is unreadable or not a LoRA adapter's.
            BadRequest: no ``adapter_model.safetensors`` (pickled weights are not stored).
            NotFound: ``base`` is not a repository here holding a base.
            AlreadyExists: ``name`` holds a fine-tune stored against a base.
        """
        config = AdapterConfig.read(directory)
        files, left_out = split_unread(local_files(directory))
        if not any(rel == ADAPTER_WEIGHTS for rel, _ in files):
            raise BadRequest(
                f"{directory} has no {ADAPTER_WEIGHTS}; save the adapter with "
                "save_pretrained(..., safe_serialization=True)",
                code="invalid_adapter",
            )
        name = name or Path(directory).resolve().name
        base = base or self._base_repo(config.base_model_name_or_path)
        repo = self._adapter_repo(name, base)
        commit, report = commit_files(
            self._conn,
            _repo_id(repo),
            files,
            message=f"slim push: adapter {name}",
            progress=progress,
        )
        report.left_out = left_out
        adapter = read_adapter(self._conn, self.get_repo(name), commit)
        assert adapter is not None  # its adapter_config.json was just committed
        return adapter, report

    def _base_repo(self, ref: str | None) -> str | None:
        """``ref`` when it names a repository here whose ``main`` holds a base."""
        if not ref:
            return None
        try:
            return ref if self.get_revision(ref).base_id is not None else None
        except (NotFound, BadRequest):
            return None

    def _adapter_repo(self, name: str, base: str | None) -> Repo:
        try:
            return self.create_repo(name, base=base)
        except Conflict:  # it exists
            pass
        repo = self.get_repo(name)
        if repo.main is not None:
            held = self.get_revision(name)
            files = [] if held.checkpoint_id else hub_files(self._conn, _repo_id(repo), "main")[1]
            paths = {f.path for f in files} - {GITATTRIBUTES}
            if held.checkpoint_id is not None or (paths and ADAPTER_CONFIG not in paths):
                raise AlreadyExists(
                    f"{name!r} holds a model, not a PEFT adapter; push the adapter under "
                    "another --name"
                )
        if base is not None:
            repo = self.update_repo(name, base=base)
        return repo

    def list_adapters(self) -> list[Adapter]:
        """The repositories whose ``main`` holds a PEFT adapter, by name."""
        found = []
        for repo in self.list_repos():
            if repo.main is None:
                continue
            try:
                adapter = read_adapter(self._conn, repo)
            except NotFound:  # a revision whose files are not served (a failed push)
                continue
            if adapter is not None:
                found.append(adapter)
        return found

    def get_adapter(self, name: str, revision: str | None = None) -> Adapter:
        """The adapter at ``revision`` (default ``main``) of repository ``name``.

        Raises:
            NotFound: no such repository, revision, or no adapter there.
        """
        adapter = read_adapter(self._conn, self.get_repo(name), revision)
        if adapter is None:
            raise not_an_adapter(name)
        return adapter

    def pull_adapter(
        self,
        name: str,
        out_dir: str | os.PathLike[str],
        *,
        revision: str | None = None,
        progress: Progress | None = None,
    ) -> PullReport:
        """The adapter's files into ``out_dir``, byte for byte as pushed (each checked
        against its sha256; interrupted downloads resume)."""
        return download_files(
            self._conn, self.get_adapter(name, revision), out_dir, progress=progress
        )

    def pull_merged(
        self,
        name: str,
        out_dir: str | os.PathLike[str],
        *,
        base: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
    ) -> PullReport:
        """The adapter merged into its base's weights, written to ``out_dir`` as a full model
        directory (``AutoModel.from_pretrained`` loads it; :func:`core.peft.merge_adapter`).

        The base is downloaded once into the cache :meth:`pull_local` uses (verified by
        sha256) and the adapter under ``<cache>/adapters/<commit>/``; the merge runs here.

        Args:
            base: the base to merge into — a repository here holding a base, or a base's
                name or id (default: the base recorded at push time, else the one
                ``adapter_config.json`` names if it is a repository here).

        Raises:
            NotFound: no base recorded and none given.
            InvalidAdapter: the adapter does not fit the base (names, shapes) or uses an
                option merging does not support.
        """
        importing = threading.Thread(
            target=importlib.import_module, args=("core.peft",), daemon=True
        )
        importing.start()
        t0 = time.perf_counter()
        adapter = self.get_adapter(name, revision)
        the_base = self._merge_base(adapter, base)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        bar = progress or NoProgress()
        report = PullReport(local=True)
        base_dir, report.base_bytes = self._cached_base(the_base, cache, bar)
        fetched = download_files(
            self._conn, adapter, cache / "adapters" / adapter.commit_id, progress=bar
        )
        report.delta_bytes = fetched.bytes_received
        importing.join()
        from core.peft import merge_adapter  # raises here if the import failed

        bar.start(f"merging {adapter.name} into {the_base.name}", 0)
        try:
            merged = merge_adapter(base_dir, cache / "adapters" / adapter.commit_id, out_dir)
        finally:
            bar.finish()
        out = Path(out_dir)
        for path in merged.files:
            rel = path.relative_to(out).as_posix()
            report.files.append(PulledFile(rel, path.stat().st_size, sha256_file(path)))
        report.bytes_received = report.base_bytes + report.delta_bytes
        report.seconds = time.perf_counter() - t0
        return report

    def _merge_base(self, adapter: Adapter, ref: str | None) -> Base:
        """The base ``ref`` names (a repository holding a base, else a base's name or id), or
        the one recorded with the adapter's repository, or the one its config names."""
        if ref is None and adapter.base_id is not None:
            return self.get_base(adapter.base_id)
        ref = ref or self._base_repo(adapter.base_model)
        if ref is None:
            raise NotFound(
                f"no base is recorded for adapter {adapter.name!r} (its config names "
                f"{adapter.base_model!r}, not a base here); pass --base BASE"
            )
        try:
            held = self.get_revision(ref)
            if held.base_id is not None:
                return self.get_base(held.base_id)
        except NotFound:
            pass
        return self.get_base(ref)

    # -- jobs ----------------------------------------------------------------------------------

    def list_jobs(self, *, state: str | None = None, checkpoint_id: str | None = None) -> list[Job]:
        """Jobs, newest first."""
        params = {k: v for k, v in (("state", state), ("checkpoint_id", checkpoint_id)) if v}
        return [Job.from_json(j) for j in self._conn.pages("/v1/jobs", **params)]

    def get_job(self, ref: str) -> Job:
        """A job by id; a checkpoint's id or name gives that checkpoint's latest job."""
        if _UUID.match(ref):
            try:
                return Job.from_json(self._conn.json("GET", f"/v1/jobs/{ref}"))
            except NotFound:
                pass
        try:
            ckpt = self.get_checkpoint(ref)
        except NotFound:
            raise NotFound(
                f"no job or checkpoint {ref!r}; list checkpoints with `slim ls`"
            ) from None
        jobs = self.list_jobs(checkpoint_id=ckpt.id)
        if not jobs:
            raise NotFound(f"checkpoint {ckpt.name!r} has no job yet (it is {ckpt.state})")
        return jobs[0]

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_json(self._conn.json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str,
        *,
        on_update: Callable[[Job], None] | None = None,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        check: bool = True,
    ) -> Job:
        """Poll a job until it is done; ``on_update`` sees every answer.

        Raises:
            JobFailed: the job failed or was cancelled (unless ``check`` is false).
            TimeoutError: still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = Job.from_json(self._conn.json("GET", f"/v1/jobs/{job_id}"))
            if on_update is not None:
                on_update(job)
            if job.done:
                if check and job.state != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout}s")
            time.sleep(poll_seconds)

    # -- merges and totals ---------------------------------------------------------------------

    def merge(
        self,
        refs: list[str],
        name: str,
        *,
        method: str = "task_arithmetic",
        lam: float = 1.0,
        density: float | None = None,
        heads_from: str | None = None,
    ) -> Job:
        """Merge ready checkpoints of one base into a new checkpoint; answers with the job.

        ``heads_from`` (one of ``refs``) names the parent whose own tensors (heads), config and
        tokenizer the merge keeps; needed when the parents' heads differ (never averaged)."""
        ids = [self.get_checkpoint(r).id for r in refs]
        body: dict[str, Any] = {"name": name, "checkpoint_ids": ids, "method": method}
        body["lambda"] = lam
        if density is not None:
            body["density"] = density
        if heads_from is not None:
            body["heads_from"] = self.get_checkpoint(heads_from).id
        return Job.from_json(self._conn.json("POST", "/v1/merges", json=body))

    def stats(self) -> Stats:
        return build(Stats, self._conn.json("GET", "/v1/stats"))


# -- helpers -------------------------------------------------------------------------------------


def _repo_id(repo: Repo) -> str:
    """A repository as the Hub routes name it."""
    return f"{repo.namespace}/{repo.name}"


def _segment(text: str) -> str:
    """A name as one URL path segment."""
    return quote(text, safe="")


_Named = TypeVar("_Named", Base, Checkpoint)


def _pick(rows: list[_Named], ref: str, what: str, hint: str) -> _Named:
    """The row named ``ref``, else the one whose id starts with ``ref``."""
    for row in rows:
        if row.name == ref:
            return row
    if len(ref) >= _MIN_PREFIX:
        hits = [row for row in rows if row.id.startswith(ref.lower())]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BadRequest(
                f"{ref!r} is the start of {len(hits)} {what} ids; give more characters",
                code="ambiguous_reference",
            )
    raise NotFound(f"no {what} named or with id {ref!r}; list them with `{hint}`")
