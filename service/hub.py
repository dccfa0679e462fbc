"""The read side of the Hugging Face Hub protocol over Slimstore's repositories (the routes are
:mod:`service.routes.hub`).

With ``HF_ENDPOINT`` pointing at the server and ``HF_TOKEN`` a Slimstore API key,
``huggingface_hub`` and ``transformers`` read repositories as they read the Hub. What this module
decides (``docs/hub.md`` says the same for users):

- **Repo ids.** ``namespace/name`` is the repository ``name`` of Slimstore namespace
  ``namespace``; a bare ``name`` is a repository of the caller's namespace. A namespace other than
  the key's is ``RepoNotFound`` — exactly like a repository that does not exist.
- **Revisions.** A Hub revision is a Slimstore ref (``main``), a full commit id or a unique prefix
  (:func:`storage.revisions.resolve_revision`); every ref is a branch.
- **Files.** Every file is described as a Git LFS object: its ``lfs.oid`` / ``ETag`` /
  ``X-Linked-Etag`` is the sha256 of the file's bytes (for a checkpoint, of the file rebuilt from
  the base and the delta — ``recon_sha256``), its ``oid`` the git blob id of the LFS pointer, so
  a client's cache is keyed by the content. Nothing advertises Xet.
- **Errors** carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) and ``X-Error-Message`` headers and a ``{"error", "code", "detail"}`` body;
  a missing file also carries ``X-Repo-Commit``, so clients cache the miss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from storage import commits, revisions
from storage.errors import NotFound
from storage.models import Base, Checkpoint, CheckpointState, File, Revision

HEADER_COMMIT: Final = "X-Repo-Commit"
HEADER_LINKED_ETAG: Final = "X-Linked-Etag"
HEADER_LINKED_SIZE: Final = "X-Linked-Size"
HEADER_ERROR_CODE: Final = "X-Error-Code"
HEADER_ERROR_MESSAGE: Final = "X-Error-Message"

#: Slimstore error codes and the Hub's ``X-Error-Code`` each one is answered with.
HUB_CODE: Final[Mapping[str, str]] = {
    "repo_not_found": "RepoNotFound",
    "revision_not_found": "RevisionNotFound",
    "ambiguous_revision": "RevisionNotFound",
    "entry_not_found": "EntryNotFound",
}
#: The message the Hub sends with a 401 for a bad token (clients then do not read it as a
#: missing repository).
INVALID_CREDENTIALS: Final = "Invalid credentials in Authorization header"
#: Entries per page of a tree or commit listing (the Hub's own cap on a tree page).
PAGE_SIZE: Final = 1000


class EntryNotFound(NotFound):
    """A path that is not a file (or folder) of the revision."""

    code = "entry_not_found"

    def __init__(self, detail: str, commit: str | None = None) -> None:
        super().__init__(detail)
        self.commit = commit


class NotAHubRepo(revisions.RepoNotFound):
    """A repo id of the wrong shape, or of another namespace."""


def hub_error(
    code: str, detail: str, status: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer the Hub's clients understand: ``X-Error-Code`` (for the codes of
    :data:`HUB_CODE`), ``X-Error-Message`` and ``{"error", "code", "detail"}``."""
    out = {HEADER_ERROR_MESSAGE: _header_safe(detail), **(headers or {})}
    if code in HUB_CODE:
        out[HEADER_ERROR_CODE] = HUB_CODE[code]
    return JSONResponse(
        {"error": detail, "code": code, "detail": detail}, status_code=status, headers=out
    )


def _header_safe(text: str) -> str:
    """A header value: one line of printable ASCII (other characters become ``?``)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:1000]


# -- repo ids and revisions ------------------------------------------------------------------


def repo_id(namespace: str | None, name: str) -> str:
    """The Hub repo id of a route's ``{namespace}/{name}`` (or bare ``{name}``)."""
    return f"{namespace}/{name}" if namespace is not None else name


def split_repo_id(repo_id: str, caller_namespace: str) -> tuple[str, str]:
    """(namespace, name) of a Hub repo id: ``namespace/name``, or ``name`` in the caller's
    namespace.

    Raises:
        NotAHubRepo: another namespace than the caller's (nothing about it is revealed).
    """
    namespace, _, name = repo_id.rpartition("/")
    namespace = namespace or caller_namespace
    if namespace != caller_namespace or not name:
        raise NotAHubRepo(
            f"no repository {repo_id!r}; repo ids are 'name' or '{caller_namespace}/name' "
            "(your key's namespace)"
        )
    return namespace, name


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a revision as the Hub describes it."""

    path: str
    size: int
    sha256: str
    row: File

    @property
    def pointer(self) -> bytes:
        """The Git LFS pointer of the file (what a git checkout of the Hub would hold)."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    @property
    def oid(self) -> str:
        """The git blob id of the pointer (the Hub's ``oid`` of an LFS file)."""
        return git_blob_id(self.pointer)

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob holding ``data`` (sha1 over ``blob <size>\\0`` and the bytes)."""
    header = f"blob {len(data)}\0".encode()
    return hashlib.sha1(header + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class HubRevision:
    """A revision of a repository, resolved, with its stored object and files."""

    namespace: str
    name: str
    revision: Revision
    stored: Base | Checkpoint
    files: list[HubFile]

    @property
    def commit(self) -> str:
        return self.revision.commit_id

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def file(self, path: str) -> HubFile:
        """The file at ``path``.

        Raises:
            EntryNotFound: no such file in this revision (carries the commit id).
        """
        for f in self.files:
            if f.path == path:
                return f
        raise EntryNotFound(
            f"{self.repo_id} has no file {path!r} at commit {self.commit[:12]}", self.commit
        )


def resolve(session: Session, repo_id: str, rev: str | None, namespace: str) -> HubRevision:
    """The revision ``rev`` (default ``main``) of the Hub repo ``repo_id``, as the caller of
    ``namespace`` sees it.

    Raises:
        RepoNotFound, RevisionNotFound, AmbiguousRevision: see
            :func:`storage.revisions.resolve_revision`.
    """
    ns, name = split_repo_id(repo_id, namespace)
    revision = revisions.resolve_revision(session, ns, name, rev or revisions.MAIN)
    info = revisions.describe(session, [revision])[0]
    stored = info.stored
    if stored is None:
        raise revisions.RevisionNotFound(
            f"revision {revision.commit_id[:12]} of {ns}/{name} holds no stored files"
        )
    rows = list(commits.files_of(session, revision).values())
    if isinstance(stored, Checkpoint):
        rebuildable = stored.state == CheckpointState.READY and stored.delta_blob_key is not None
        if not rebuildable and not all(exact_blob(r) for r in rows):
            raise revisions.RevisionNotFound(
                f"revision {revision.commit_id[:12]} of {ns}/{name} holds no stored files"
            )
    files = [HubFile(r.path, r.size, r.recon_sha256 or r.sha256, r) for r in rows]
    return HubRevision(ns, name, revision, stored, files)


def exact_blob(row: File) -> str | None:
    """The blob holding exactly the bytes a file row serves, or None (only its delta does):
    the pushed original, kept until the exact delta replaces it."""
    if row.blob_key is not None and row.recon_sha256 in (None, row.sha256):
        return row.blob_key
    return None


def iso(when: datetime) -> str:
    """A time as the Hub writes it: ``2024-01-02T03:04:05.000Z``."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


# -- JSON answers ------------------------------------------------------------------------------


class LfsPublic(BaseModel):
    """A file's Git LFS description: ``oid`` is the sha256 of its bytes."""

    oid: str
    size: int
    pointerSize: int


class SiblingLfsPublic(BaseModel):
    sha256: str
    size: int
    pointerSize: int


class SiblingPublic(BaseModel):
    rfilename: str
    size: int
    blobId: str
    lfs: SiblingLfsPublic


class ModelInfoPublic(BaseModel):
    """What ``HfApi().model_info`` reads: the commit (``sha``) and the files (``siblings``)."""

    id: str
    modelId: str
    author: str
    sha: str
    lastModified: str
    createdAt: str
    private: bool = False
    gated: bool = False
    disabled: bool = False
    tags: list[str]
    library_name: str | None = None
    siblings: list[SiblingPublic]
    usedStorage: int
    cardData: dict[str, object] = Field(default_factory=dict)


class TreeEntryPublic(BaseModel):
    """A file (``type: file``, with ``lfs``) or a folder (``type: directory``) of a tree."""

    type: str
    oid: str
    size: int
    path: str
    lfs: LfsPublic | None = None


class AuthorPublic(BaseModel):
    user: str


class CommitPublic(BaseModel):
    id: str
    title: str
    message: str
    authors: list[AuthorPublic]
    date: str


class RefPublic(BaseModel):
    name: str
    ref: str
    targetCommit: str


class RefsPublic(BaseModel):
    branches: list[RefPublic]
    converts: list[RefPublic] = Field(default_factory=list)
    tags: list[RefPublic] = Field(default_factory=list)
    pullRequests: list[RefPublic] | None = None


class WhoamiPublic(BaseModel):
    """What ``HfApi().whoami`` reads: the key's namespace as the user name."""

    type: str = "user"
    name: str
    fullname: str
    auth: dict[str, object]
    orgs: list[dict[str, object]] = Field(default_factory=list)


def model_info(rev: HubRevision) -> ModelInfoPublic:
    created = rev.revision.created_at
    kind = "base" if isinstance(rev.stored, Base) else "fine-tune"
    return ModelInfoPublic(
        id=rev.repo_id,
        modelId=rev.repo_id,
        author=rev.namespace,
        sha=rev.commit,
        lastModified=iso(created),
        createdAt=iso(created),
        tags=["safetensors", "slimstore", kind],
        library_name="transformers" if any(f.path == "config.json" for f in rev.files) else None,
        siblings=[
            SiblingPublic(
                rfilename=f.path,
                size=f.size,
                blobId=f.oid,
                lfs=SiblingLfsPublic(sha256=f.sha256, size=f.size, pointerSize=len(f.pointer)),
            )
            for f in rev.files
        ],
        usedStorage=sum(f.size for f in rev.files),
    )


def tree(rev: HubRevision, path: str, *, recursive: bool) -> list[TreeEntryPublic]:
    """The entries under folder ``path`` ("" for the root): its files and folders (with
    ``recursive``, every file and folder below it), folders first at each level, by path.

    Raises:
        EntryNotFound: ``path`` is not a folder of the revision.
    """
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    files: list[TreeEntryPublic] = []
    folders: dict[str, list[HubFile]] = {}
    for f in rev.files:
        if not f.path.startswith(prefix):
            continue
        rest = f.path[len(prefix) :]
        parts = rest.split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folders.setdefault(prefix + "/".join(parts[:depth]), []).append(f)
        if recursive or len(parts) == 1:
            files.append(
                TreeEntryPublic(
                    type="file",
                    oid=f.oid,
                    size=f.size,
                    path=f.path,
                    lfs=LfsPublic(oid=f.sha256, size=f.size, pointerSize=len(f.pointer)),
                )
            )
    if prefix and not files and not folders:
        raise EntryNotFound(
            f"{rev.repo_id} has no folder {path!r} at commit {rev.commit[:12]}", rev.commit
        )
    dirs = [
        TreeEntryPublic(type="directory", oid=_tree_id(name, members), size=0, path=name)
        for name, members in sorted(folders.items())
    ]
    return sorted([*dirs, *files], key=lambda e: (e.path.count("/"), e.type != "directory", e.path))


def _tree_id(name: str, members: list[HubFile]) -> str:
    """A stable id of a folder's contents (changes whenever a file under it changes)."""
    text = "\n".join([name, *(f"{m.path} {m.sha256}" for m in members)])
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def history(session: Session, rev: HubRevision) -> list[CommitPublic]:
    """The commits reachable from ``rev`` by parents, newest first."""
    repo = revisions.get_repo(session, name=rev.name, namespace=rev.namespace)
    by_commit = {r.commit_id: r for r in revisions.list_revisions(session, repo, limit=1_000_000)}
    out = []
    current: Revision | None = rev.revision
    while current is not None:
        title, _, body = current.message.partition("\n")
        out.append(
            CommitPublic(
                id=current.commit_id,
                title=title or f"revision {current.number}",
                message=body.strip(),
                authors=[AuthorPublic(user=rev.namespace)],
                date=iso(current.created_at),
            )
        )
        parent = current.parent_commit
        current = by_commit.get(parent) if parent else None
    return out


def refs(session: Session, repo_id: str, namespace: str) -> RefsPublic:
    """Every ref of the repository, as branches."""
    ns, name = split_repo_id(repo_id, namespace)
    repo = revisions.get_repo(session, name=name, namespace=ns)
    rows = revisions.list_revisions(session, repo, limit=1_000_000)
    branches = [
        RefPublic(name=ref, ref=f"refs/heads/{ref}", targetCommit=info.revision.commit_id)
        for info in revisions.describe(session, rows)
        for ref in info.refs
    ]
    return RefsPublic(branches=sorted(branches, key=lambda b: b.name))
