"""Commits pushed through the Hub protocol: a set of files becomes a repository's revision.

This module owns the state changes of a Hub push (``service.hub_write`` decides what a push
means; the routes are ``service.routes.hub_write``):

- :func:`create_repo`: a new repository with its first revision, holding one ``.gitattributes``
  file (the Hub starts every repository so; clients expect ``main`` to exist).
- :func:`commit`: the files of a new revision — the parent revision's files with the commit's
  additions and deletions applied — stored **exact**, visible at once:

  - without a base, stored whole: a :class:`~storage.models.Base` (ready) whose files are the
    pushed blobs (content-addressed, so unchanged files share their blob with the parent);
  - against a base, a checkpoint ``E`` whose files are the pushed blobs, served as they are
    until its ``lossless`` job replaces them with an exact delta; then a second checkpoint
    ``L`` under the repository's policy (``auto`` at a fidelity floor by default) is queued on
    the same blobs. When ``L`` is published it becomes the next revision on ``main`` if
    ``main`` is still at ``E``'s commit (:data:`LANDS_ON`), else on the ref
    ``compressed-<E's commit>`` (a newer push is never overwritten); if it found nothing
    smaller than the exact delta, it lands nowhere (:func:`storage.queue.publish`).

Revisions are immutable: no revision's bytes ever change; what compression does shows as a new
commit. Like the rest of ``storage``, these functions flush but never commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.files import check_path, manifest_sha256
from core.params import CompressParams, Method
from storage import revisions
from storage.blob_common import BlobInfo
from storage.db import for_update
from storage.errors import NotFound
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    File,
    FileRole,
    Job,
    JobKind,
    JobState,
    Repo,
    Revision,
)
from storage.queue import LANDS_ON, enqueue
from storage.repo import list_files, put_file, record_blob


@dataclass(frozen=True, slots=True)
class CommitFile:
    """A file of a revision being committed: its bytes are the blob ``blob_key``."""

    path: str
    size: int
    sha256: str
    blob_key: str
    role: FileRole


def files_of(session: Session, revision: Revision) -> dict[str, File]:
    """The file rows of a revision, by path."""
    if revision.base_id is not None:
        rows = list_files(session, base_id=revision.base_id)
    else:
        rows = list_files(session, checkpoint_id=revision.checkpoint_id)
    return {r.path: r for r in rows}


def create_repo(session: Session, *, namespace: str, name: str, first: CommitFile) -> Revision:
    """A new repository ``namespace/name`` and its first revision, holding ``first``.

    Raises:
        AlreadyExists: the namespace has a repository of this name.
    """
    repo = revisions.create_repo(session, name=name, namespace=namespace)
    return _commit_whole(session, repo, [first], "initial commit", expected_parent=None)


def commit(
    session: Session,
    repo: Repo,
    files: Iterable[CommitFile],
    *,
    message: str,
    expected_parent: str | None,
    base: Base | None,
    policy: CompressParams | None,
    ref: str = revisions.MAIN,
    max_attempts: int = 3,
) -> Revision:
    """Add the revision holding ``files`` to ``repo`` on ``main`` (see the module docstring).

    Args:
        expected_parent: the commit ``main`` must be at (:data:`storage.revisions.ANY_PARENT`:
            whatever it is).
        base: the ready base to store the files against, or None (stored whole).
        policy: the compression to queue after the exact copy (with a base only; None: none).

    Raises:
        ParentMismatch: ``main`` is not at ``expected_parent`` (nothing changed).
    """
    files = list(files)
    revisions.lock_repo(session, repo)  # before naming rows after the revision number
    if base is None:
        return _commit_whole(
            session, repo, files, message, expected_parent=expected_parent, ref=ref
        )
    exact = _checkpoint(session, repo, base, files, CompressParams(method=Method.LOSSLESS))
    revision = revisions.add_revision(
        session,
        repo,
        manifest_sha256=manifest(files),
        message=message,
        checkpoint_id=exact.id,
        expected_parent=expected_parent,
        ref=ref,
    )
    repo.base_id = base.id
    enqueue(session, JobKind.COMPRESS, exact.id, max_attempts=max_attempts)
    if policy is not None and policy.method != Method.LOSSLESS and ref == revisions.MAIN:
        smaller = _checkpoint(session, repo, base, files, policy)
        enqueue(
            session,
            JobKind.COMPRESS,
            smaller.id,
            payload={LANDS_ON: revision.commit_id},
            max_attempts=max_attempts,
        )
    return revision


def commit_reusing(
    session: Session,
    repo: Repo,
    files: Iterable[CommitFile],
    *,
    served: Mapping[str, str],
    parent: Checkpoint,
    delta: BlobInfo,
    message: str,
    expected_parent: str | None,
    ref: str = revisions.MAIN,
) -> Revision:
    """Add the revision of a commit that keeps the weights of ``parent`` (a ready checkpoint)
    and changes only small files: a ready checkpoint whose delta ``delta`` is the parent's with
    the new small files (:func:`core.rewrite.with_aux_files`), the same compression, no job.

    Args:
        served: the sha256 of the bytes each of the parent's files serves, by path.

    Raises:
        ParentMismatch: ``ref`` is not at ``expected_parent`` (nothing changed).
    """
    files = list(files)
    revisions.lock_repo(session, repo)
    record_blob(session, delta)
    checkpoint = Checkpoint(
        namespace=repo.namespace,
        name=repo.name,
        base_id=parent.base_id,
        method=parent.method,
        params=dict(parent.params or {}),
        state=CheckpointState.READY,
        delta_blob_key=delta.key,
        original_bytes=parent.original_bytes,
        stored_bytes=delta.size,
        num_params=parent.num_params,
        bits_per_param=parent.bits_per_param,
        ratio=parent.original_bytes / delta.size if delta.size else None,
        fitness=parent.fitness,
        trace=parent.trace,
        search_seconds=parent.search_seconds,
    )
    session.add(checkpoint)
    session.flush()
    for f in files:
        sha256 = served.get(f.path, f.sha256) if f.role == FileRole.WEIGHTS else f.sha256
        row = _put(
            session,
            CommitFile(f.path, f.size, sha256, f.blob_key, f.role),
            checkpoint_id=checkpoint.id,
            blob=False,
        )
        row.recon_sha256 = sha256  # the delta rebuilds every file, the small ones included
    return revisions.add_revision(
        session,
        repo,
        manifest_sha256=manifest(files),
        message=message,
        checkpoint_id=checkpoint.id,
        expected_parent=expected_parent,
        ref=ref,
    )


def queued_compression(
    session: Session, repo: Repo, *, of_commit: str, files: Iterable[CommitFile]
) -> Job | None:
    """The queued (not started) policy compression of revision ``of_commit``, when it
    compresses the same weights as ``files`` and every other file of ``files`` has its blob —
    so it can be handed to a newer revision (:func:`retarget_compression`); else None."""
    files = list(files)
    weights = {(f.path, f.sha256) for f in files if f.role == FileRole.WEIGHTS}
    if not weights or any(not f.blob_key for f in files if f.role != FileRole.WEIGHTS):
        return None
    stmt = select(Job).where(Job.kind == JobKind.COMPRESS, Job.state == JobState.QUEUED)
    for job in session.scalars(for_update(session, stmt)):
        if (job.payload or {}).get(LANDS_ON) != of_commit:
            continue
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        if checkpoint is None or checkpoint.namespace != repo.namespace:
            continue
        rows = list_files(session, checkpoint_id=checkpoint.id)
        mine = {(r.path, r.sha256) for r in rows if r.role == FileRole.WEIGHTS}
        if mine == weights and all(r.blob_key for r in rows if r.role == FileRole.WEIGHTS):
            return job
    return None


def retarget_compression(
    session: Session, job: Job, *, to_commit: str, files: Iterable[CommitFile]
) -> None:
    """Hand the queued compression ``job`` (:func:`queued_compression`) to the newer revision
    ``to_commit`` with the same weights (a README or tokenizer pushed after the model): it
    compresses those weights with the new revision's small files and lands on top of it, so
    the weights are not compressed twice."""
    for row in list_files(session, checkpoint_id=job.checkpoint_id):
        if row.role != FileRole.WEIGHTS:
            session.delete(row)
    session.flush()
    for f in files:
        if f.role != FileRole.WEIGHTS:
            _put(session, f, checkpoint_id=job.checkpoint_id)
    job.payload = {**(job.payload or {}), LANDS_ON: to_commit}
    session.flush()


def _commit_whole(
    session: Session,
    repo: Repo,
    files: list[CommitFile],
    message: str,
    *,
    expected_parent: str | None,
    ref: str = revisions.MAIN,
) -> Revision:
    number = revisions.next_number(session, repo)
    name = repo.name if number == 1 and _base_name_free(session, repo) else f"{repo.name}@{number}"
    stored = Base(
        namespace=repo.namespace,
        name=name,
        state=BaseState.READY,
        total_bytes=sum(f.size for f in files),
        manifest_sha256=manifest(files),
    )
    session.add(stored)
    session.flush()
    for f in files:
        _put(session, f, base_id=stored.id)
    return revisions.add_revision(
        session,
        repo,
        manifest_sha256=manifest(files),
        message=message,
        base_id=stored.id,
        expected_parent=expected_parent,
        ref=ref,
    )


def _checkpoint(
    session: Session, repo: Repo, base: Base, files: list[CommitFile], params: CompressParams
) -> Checkpoint:
    resolved = params.resolve()
    row: Mapping[str, Any] = resolved.to_dict()
    checkpoint = Checkpoint(
        namespace=repo.namespace,
        name=repo.name,
        base_id=base.id,
        method=str(resolved.method),
        params=dict(row),
        state=CheckpointState.QUEUED,
        original_bytes=sum(f.size for f in files if f.role == FileRole.WEIGHTS),
    )
    session.add(checkpoint)
    session.flush()
    for f in files:
        _put(session, f, checkpoint_id=checkpoint.id)
    return checkpoint


def _put(
    session: Session,
    f: CommitFile,
    *,
    base_id: str | None = None,
    checkpoint_id: str | None = None,
    blob: bool = True,
) -> File:
    check_path(f.path)
    return put_file(
        session,
        path=f.path,
        size=f.size,
        sha256=f.sha256,
        blob_key=f.blob_key if blob else None,
        role=f.role,
        base_id=base_id,
        checkpoint_id=checkpoint_id,
    )


def manifest(files: Iterable[CommitFile]) -> str:
    """The identity of a commit's file set (:func:`core.files.manifest_sha256`)."""
    return manifest_sha256((f.path, f.sha256) for f in files)


def _base_name_free(session: Session, repo: Repo) -> bool:
    taken = session.scalars(
        select(Base.id).where(Base.namespace == repo.namespace, Base.name == repo.name)
    ).first()
    return taken is None


def base_of_repo(session: Session, *, namespace: str, name: str) -> Base:
    """The base a fine-tune naming repository ``name`` as its base is stored against: the base
    holding the files of that repository's ``main`` revision.

    Raises:
        RepoNotFound, RevisionNotFound: no such repository, or no revision yet.
        NotFound: its ``main`` is a fine-tune stored against a base, not a base.
    """
    head = revisions.resolve_revision(session, namespace, name, revisions.MAIN)
    if head.base_id is None:
        raise NotFound(
            f"repository {name!r} is a fine-tune stored against a base, not a base itself"
        )
    base = session.get(Base, head.base_id)
    weights = [r for r in list_files(session, base_id=head.base_id) if r.role == FileRole.WEIGHTS]
    if base is None or base.state != BaseState.READY or not weights:
        raise NotFound(f"repository {name!r} holds no base (no weights a model is stored against)")
    return base
