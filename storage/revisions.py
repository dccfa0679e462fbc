"""Repositories and their revisions: the history of a model under one name.

A repository (:class:`~storage.models.Repo`, ``namespace/name``) owns the name users see. Each
push that becomes visible adds an immutable :class:`~storage.models.Revision` with a 40-hex
commit id, its parent (the commit ``main`` pointed at), a message and a time; the revision
points at exactly one stored object — a base or a checkpoint — whose files (names, sizes,
sha256) never change from then on. Refs (:class:`~storage.models.Ref`) name revisions;
``main`` points at the newest. Older revisions stay readable until deleted
(:func:`delete_revision`) or expired (:func:`expire_revisions`, the retention setting).

A revision is spelled (:func:`resolve_revision`) as a ref name (``main``), a full commit id, or
a unique prefix of at least :data:`MIN_PREFIX` hex digits of one.

Which checkpoint a checkpoint name means (:func:`checkpoint_for_name`, used by every route
through ``storage.repo.get_checkpoint``): the checkpoint of the repository's ``main``
revision; while a repository has none yet, its push in flight.

Like :mod:`storage.repo`, these functions change rows and flush but never commit; changes to
a repository's history (:func:`add_revision`, :func:`move_ref`, :func:`delete_revision`) lock
the repository row first (``FOR UPDATE`` on PostgreSQL; on SQLite, call them in a write
transaction, :func:`storage.db.begin_write`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import and_, exists, func, select
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session

from storage.db import for_update
from storage.errors import AlreadyExists, Conflict, NotFound, StorageError
from storage.models import (
    DEFAULT_NAMESPACE,
    Base,
    Checkpoint,
    Ref,
    Repo,
    Revision,
    utcnow,
)

MAIN: Final = "main"
#: The fewest hex digits a commit id prefix may have.
MIN_PREFIX: Final = 7
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX = re.compile(rf"^[0-9a-f]{{{MIN_PREFIX},40}}$")
_REF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


class RepoNotFound(NotFound):
    """No repository of that name in the namespace."""

    code = "repo_not_found"


class RevisionNotFound(NotFound):
    """The repository has no revision by that ref name, commit id or prefix."""

    code = "revision_not_found"


class AmbiguousRevision(StorageError):
    """A commit id prefix that starts more than one revision of the repository."""

    code = "ambiguous_revision"


class ParentMismatch(Conflict):
    """A revision was added on a parent that is no longer the ref's head (``main`` moved)."""

    code = "parent_mismatch"


#: ``expected_parent`` of :func:`add_revision` when any parent will do.
ANY_PARENT: Final = "*"


def commit_id(
    repo_id: str, parent: str | None, manifest_sha256: str, message: str, created_at: datetime
) -> str:
    """A revision's commit id: sha1 (40 hex) over its repository, parent, files, message, time."""
    text = "\n".join([repo_id, parent or "", manifest_sha256, message, created_at.isoformat()])
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


# -- repositories ----------------------------------------------------------------------------


def create_repo(
    session: Session,
    *,
    name: str,
    namespace: str = DEFAULT_NAMESPACE,
    base_id: str | None = None,
) -> Repo:
    """A new repository with no revision yet.

    Raises:
        AlreadyExists: the namespace has a repository of this name.
    """
    repo = Repo(namespace=namespace, name=name, base_id=base_id, policy={})
    try:
        with session.begin_nested():
            session.add(repo)
    except DbIntegrityError as exc:
        raise AlreadyExists(
            f"a repository named {name!r} already exists in {namespace!r}; pick another name"
        ) from exc
    return repo


def find_repo(session: Session, *, name: str, namespace: str = DEFAULT_NAMESPACE) -> Repo | None:
    return session.scalars(
        select(Repo).where(Repo.namespace == namespace, Repo.name == name)
    ).first()


def get_repo(session: Session, *, name: str, namespace: str = DEFAULT_NAMESPACE) -> Repo:
    """The repository ``namespace/name``.

    Raises:
        RepoNotFound: none of that name in the namespace.
    """
    repo = find_repo(session, name=name, namespace=namespace)
    if repo is None:
        raise RepoNotFound(
            f"no repository named {name!r} in namespace {namespace!r}; list them with GET /v1/repos"
        )
    return repo


def claim_repo(
    session: Session, *, name: str, namespace: str, base_id: str | None, lock: bool = True
) -> Repo:
    """The repository a push of ``name`` goes to, created on its first push, locked for the
    rest of the caller's transaction (with ``lock``).

    A repository stored whole (a base, ``base_id`` None) and one stored against a base are
    different kinds; a name of the other kind is taken.

    Raises:
        AlreadyExists: ``name`` is a repository of the other kind.
    """
    repo = find_repo(session, name=name, namespace=namespace)
    if repo is None:
        try:
            repo = create_repo(session, name=name, namespace=namespace, base_id=base_id)
        except AlreadyExists:  # created meanwhile
            repo = get_repo(session, name=name, namespace=namespace)
    if (repo.base_id is None) != (base_id is None):
        what = "a base" if repo.base_id is None else "a fine-tune stored against a base"
        raise AlreadyExists(
            f"the name {name!r} is taken in {namespace!r} by {what}; pick another name"
        )
    if lock:
        _lock(session, repo)
    return repo


def list_repos(
    session: Session, *, namespace: str = DEFAULT_NAMESPACE, limit: int = 100, offset: int = 0
) -> list[Repo]:
    """Repositories of a namespace, by name."""
    stmt = (
        select(Repo)
        .where(Repo.namespace == namespace)
        .order_by(Repo.name)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt))


def delete_repo_if_empty(session: Session, repo: Repo) -> bool:
    """Delete a repository that has no revision and no push in flight; whether it did."""
    has_revision = session.scalar(select(exists().where(Revision.repo_id == repo.id)))
    in_flight = session.scalar(
        select(exists().where(Checkpoint.namespace == repo.namespace, Checkpoint.name == repo.name))
    )
    if has_revision or in_flight:
        return False
    session.delete(repo)
    session.flush()
    return True


# -- revisions -------------------------------------------------------------------------------


def head(session: Session, repo: Repo, ref: str = MAIN) -> Revision | None:
    """The revision ``ref`` points at, or None (a repository with no revision yet)."""
    return session.scalars(
        select(Revision)
        .join(Ref, Ref.revision_id == Revision.id)
        .where(Ref.repo_id == repo.id, Ref.name == ref)
    ).first()


def resolve_revision(
    session: Session, namespace: str, repo_name: str, rev: str | None = MAIN
) -> Revision:
    """The revision ``rev`` names in ``namespace/repo_name``: a ref name (``main``), a full
    commit id, or a unique prefix of one (at least :data:`MIN_PREFIX` hex digits).

    Raises:
        RepoNotFound: no such repository.
        RevisionNotFound: no such ref or commit in it.
        AmbiguousRevision: the prefix starts several commit ids.
    """
    repo = get_repo(session, name=repo_name, namespace=namespace)
    return revision_of(session, repo, rev)


def revision_of(session: Session, repo: Repo, rev: str | None = MAIN) -> Revision:
    """:func:`resolve_revision` within a repository already found."""
    rev = MAIN if rev is None else rev
    found = head(session, repo, rev)
    if found is not None:
        return found
    low = rev.lower()
    where = f"repository {repo.name!r}"
    if _HEX40.match(low):
        found = session.scalars(
            select(Revision).where(Revision.repo_id == repo.id, Revision.commit_id == low)
        ).first()
    elif _HEX_PREFIX.match(low):
        hits = list(
            session.scalars(
                select(Revision)
                .where(Revision.repo_id == repo.id, Revision.commit_id.startswith(low))
                .limit(2)
            )
        )
        if len(hits) > 1:
            raise AmbiguousRevision(
                f"{rev!r} starts more than one commit id of {where}; give more digits"
            )
        found = hits[0] if hits else None
    if found is None:
        if rev == MAIN:
            raise RevisionNotFound(f"{where} has no revision yet (its first push is not ready)")
        raise RevisionNotFound(
            f"{where} has no ref or commit {rev!r} (a ref name, a 40-hex commit id or a prefix "
            f"of at least {MIN_PREFIX} hex digits); list its revisions with "
            f"GET /v1/repos/{repo.name}/revisions"
        )
    return found


def list_revisions(
    session: Session, repo: Repo, *, limit: int = 100, offset: int = 0
) -> list[Revision]:
    """A repository's revisions, newest first."""
    stmt = (
        select(Revision)
        .where(Revision.repo_id == repo.id)
        .order_by(Revision.number.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt))


def add_revision(
    session: Session,
    repo: Repo,
    *,
    manifest_sha256: str,
    message: str,
    checkpoint_id: str | None = None,
    base_id: str | None = None,
    expected_parent: str | None = ANY_PARENT,
    ref: str = MAIN,
    created_at: datetime | None = None,
) -> Revision:
    """Add a revision holding the files of a stored checkpoint or base (exactly one) on top of
    ``ref``, and move ``ref`` to it. Its parent is the commit ``ref`` pointed at.

    Args:
        expected_parent: the commit the writer built on (None: the ref must not exist yet);
            :data:`ANY_PARENT` accepts whatever the ref points at.

    Raises:
        ParentMismatch: ``ref`` no longer points at ``expected_parent`` (nothing changed).
        ValueError: not exactly one of ``checkpoint_id`` and ``base_id``.
    """
    if (checkpoint_id is None) == (base_id is None):
        raise ValueError("a revision holds exactly one of checkpoint_id and base_id")
    _lock(session, repo)
    current = head(session, repo, ref)
    parent = None if current is None else current.commit_id
    if expected_parent != ANY_PARENT and expected_parent != parent:
        raise ParentMismatch(
            f"{ref} of repository {repo.name!r} is at {parent or 'no commit'}, not at "
            f"{expected_parent or 'no commit'}; fetch it and build on the new head"
        )
    when = created_at or utcnow()
    number = next_number(session, repo)
    revision = Revision(
        repo_id=repo.id,
        number=number,
        commit_id=commit_id(repo.id, parent, manifest_sha256, message, when),
        parent_commit=parent,
        message=message,
        manifest_sha256=manifest_sha256,
        checkpoint_id=checkpoint_id,
        base_id=base_id,
        created_at=when,
    )
    session.add(revision)
    session.flush()
    _point(session, repo, ref, revision)
    return revision


def next_number(session: Session, repo: Repo) -> int:
    """The number the repository's next revision gets (1, 2, 3, ...)."""
    top = session.scalar(select(func.max(Revision.number)).where(Revision.repo_id == repo.id))
    return (top or 0) + 1


def delete_repo(session: Session, repo: Repo) -> None:
    """Delete every revision of a repository, its pushes in flight, and the repository.

    Raises:
        Conflict: one of its revisions is a base other checkpoints are stored against.
    """
    _lock(session, repo)
    namespace, name = repo.namespace, repo.name
    for revision in list_revisions(session, repo, limit=1_000_000):
        delete_revision(session, revision)  # the last one deletes the repository
    if find_repo(session, name=name, namespace=namespace) is not None:
        for pending in session.scalars(
            select(Checkpoint).where(Checkpoint.namespace == namespace, Checkpoint.name == name)
        ):
            session.delete(pending)
        session.flush()
        delete_repo_if_empty(session, repo)


def move_ref(session: Session, repo: Repo, name: str, rev: str) -> Ref:
    """Point the ref ``name`` of a repository at the revision ``rev`` names (created if new).

    Raises:
        RevisionNotFound, AmbiguousRevision: ``rev`` names no single revision.
        InvalidRefName (ValueError): ``name`` is not a ref name.
    """
    if not _REF_NAME.match(name) or _HEX_PREFIX.match(name.lower()):
        raise ValueError(f"{name!r} is not a ref name (letters, digits, . _ / -; not hex)")
    _lock(session, repo)
    return _point(session, repo, name, revision_of(session, repo, rev))


def delete_ref(session: Session, repo: Repo, name: str) -> None:
    """Delete the ref ``name`` (not ``main``); its revisions stay until deleted or expired.

    Raises:
        RevisionNotFound: no such ref.
    """
    _lock(session, repo)
    ref = session.scalars(select(Ref).where(Ref.repo_id == repo.id, Ref.name == name)).first()
    if ref is None:
        raise RevisionNotFound(f"repository {repo.name!r} has no ref {name!r}")
    session.delete(ref)
    session.flush()


def delete_revision(session: Session, revision: Revision) -> None:
    """Delete a revision and the stored object that holds its files (the object's blobs go to
    garbage collection). Refs that pointed at it move to its parent if that still exists, else
    to the newest revision left; a repository left with no revision (and no push in flight)
    is deleted.

    Raises:
        Conflict: the revision's object is a base that checkpoints are stored against.
    """
    repo = session.get(Repo, revision.repo_id)
    if repo is None:  # the foreign key keeps it; here for the type checker
        raise RevisionNotFound(f"revision {revision.commit_id} has no repository")
    _lock(session, repo)
    refs = list(session.scalars(select(Ref).where(Ref.revision_id == revision.id)))
    if revision.base_id is not None:
        dependents = session.scalar(
            select(func.count())
            .select_from(Checkpoint)
            .where(Checkpoint.base_id == revision.base_id)
        )
        if dependents:
            raise Conflict(
                f"revision {revision.commit_id[:12]} of {repo.name!r} is a base that "
                f"{dependents} checkpoint(s) are stored against; delete those first"
            )
    stored: Base | Checkpoint | None = (
        session.get(Checkpoint, revision.checkpoint_id)
        if revision.checkpoint_id is not None
        else session.get(Base, revision.base_id)
    )
    if refs:
        others = select(Revision).where(Revision.repo_id == repo.id, Revision.id != revision.id)
        successor = None
        if revision.parent_commit is not None:
            successor = session.scalars(
                others.where(Revision.commit_id == revision.parent_commit)
            ).first()
        if successor is None:
            successor = session.scalars(others.order_by(Revision.number.desc())).first()
        for ref in refs:
            if successor is None:
                session.delete(ref)
            else:
                ref.revision_id = successor.id
        session.flush()
    session.delete(revision)
    session.flush()  # before its object, whose delete would cascade to it
    if stored is not None:
        session.delete(stored)
    session.flush()
    delete_repo_if_empty(session, repo)


def expire_revisions(
    session: Session,
    *,
    older_than: timedelta | None,
    now: datetime | None = None,
    namespace: str | None = None,
) -> list[str]:
    """Delete the revisions older than ``older_than`` that no ref points at (the retention
    setting; None keeps every revision). Revisions of a base other checkpoints are stored
    against are kept. Returns the commit ids deleted.
    """
    if older_than is None:
        return []
    cutoff = (now or utcnow()) - older_than
    stmt = (
        select(Revision)
        .join(Repo, Repo.id == Revision.repo_id)
        .where(
            Revision.created_at < cutoff,
            ~exists().where(Ref.revision_id == Revision.id),
            ~exists().where(
                and_(Revision.base_id.is_not(None), Checkpoint.base_id == Revision.base_id)
            ),
        )
        .order_by(Revision.created_at)
    )
    if namespace is not None:
        stmt = stmt.where(Repo.namespace == namespace)
    gone = []
    for revision in list(session.scalars(stmt)):
        gone.append(revision.commit_id)
        delete_revision(session, revision)
    return gone


@dataclass(frozen=True, slots=True)
class RevisionInfo:
    """A revision, the stored object holding its files, and the refs pointing at it."""

    revision: Revision
    stored: Checkpoint | Base | None
    refs: list[str]


def describe(session: Session, rows: list[Revision]) -> list[RevisionInfo]:
    """:class:`RevisionInfo` of each revision, in the same order (three queries in all)."""
    ids = [r.id for r in rows]
    refs: dict[str, list[str]] = {}
    for ref_name, revision_id in session.execute(
        select(Ref.name, Ref.revision_id).where(Ref.revision_id.in_(ids)).order_by(Ref.name)
    ):
        refs.setdefault(revision_id, []).append(ref_name)
    ckpt_ids = [r.checkpoint_id for r in rows if r.checkpoint_id is not None]
    base_ids = [r.base_id for r in rows if r.base_id is not None]
    ckpts = {
        c.id: c for c in session.scalars(select(Checkpoint).where(Checkpoint.id.in_(ckpt_ids)))
    }
    bases = {b.id: b for b in session.scalars(select(Base).where(Base.id.in_(base_ids)))}
    out = []
    for r in rows:
        stored: Checkpoint | Base | None = (
            ckpts.get(r.checkpoint_id)
            if r.checkpoint_id is not None
            else bases.get(r.base_id or "")
        )
        out.append(RevisionInfo(r, stored, refs.get(r.id, [])))
    return out


def revision_counts(session: Session, repos: list[Repo]) -> dict[str, tuple[str | None, int]]:
    """(main's commit id, number of revisions) of each repository, by repository id."""
    ids = [r.id for r in repos]
    counts = dict(
        session.execute(
            select(Revision.repo_id, func.count())
            .where(Revision.repo_id.in_(ids))
            .group_by(Revision.repo_id)
        ).all()
    )
    mains = dict(
        session.execute(
            select(Ref.repo_id, Revision.commit_id)
            .join(Revision, Revision.id == Ref.revision_id)
            .where(Ref.repo_id.in_(ids), Ref.name == MAIN)
        ).all()
    )
    return {i: (mains.get(i), int(counts.get(i, 0))) for i in ids}


# -- what a name means -----------------------------------------------------------------------


def checkpoint_for_name(session: Session, *, name: str, namespace: str) -> Checkpoint | None:
    """The checkpoint a checkpoint name means: that of the repository's ``main`` revision,
    else (no revision yet) its newest push in flight; None when nothing has that name."""
    main = session.scalars(
        select(Checkpoint)
        .join(Revision, Revision.checkpoint_id == Checkpoint.id)
        .join(Ref, and_(Ref.revision_id == Revision.id, Ref.name == MAIN))
        .join(Repo, Repo.id == Revision.repo_id)
        .where(Repo.namespace == namespace, Repo.name == name)
    ).first()
    return main if main is not None else in_flight(session, name=name, namespace=namespace)


def in_flight(session: Session, *, name: str, namespace: str) -> Checkpoint | None:
    """The newest checkpoint of this name that holds no revision yet: a push not yet ready
    (uploading, queued, compressing or failed), or None."""
    return session.scalars(
        select(Checkpoint)
        .where(
            Checkpoint.namespace == namespace,
            Checkpoint.name == name,
            ~exists().where(Revision.checkpoint_id == Checkpoint.id),
        )
        .order_by(Checkpoint.created_at.desc())
    ).first()


def repo_of_base(session: Session, base: Base) -> Repo | None:
    """The repository whose revision holds this base (or that it is being pushed to)."""
    found = session.scalars(
        select(Repo).join(Revision, Revision.repo_id == Repo.id).where(Revision.base_id == base.id)
    ).first()
    if found is not None:
        return found
    return session.scalars(
        select(Repo).where(
            Repo.namespace == base.namespace, Repo.name == base.name, Repo.base_id.is_(None)
        )
    ).first()


# -- helpers ---------------------------------------------------------------------------------


def lock_repo(session: Session, repo: Repo) -> None:
    """Hold the repository row for the rest of the transaction (PostgreSQL: FOR UPDATE):
    what a writer reads of its history then stays true until it commits."""
    _lock(session, repo)


def _lock(session: Session, repo: Repo) -> None:
    """Hold the repository row for the rest of the transaction (PostgreSQL: FOR UPDATE)."""
    session.execute(for_update(session, select(Repo.id).where(Repo.id == repo.id)))


def _point(session: Session, repo: Repo, name: str, revision: Revision) -> Ref:
    ref = session.scalars(select(Ref).where(Ref.repo_id == repo.id, Ref.name == name)).first()
    if ref is None:
        ref = Ref(repo_id=repo.id, name=name, revision_id=revision.id)
        session.add(ref)
    else:
        ref.revision_id = revision.id
    session.flush()
    return ref
