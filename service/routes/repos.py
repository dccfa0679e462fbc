"""``/v1/repos``: repositories and their revisions (history, one revision, delete one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from service.deps import NamespaceDep, SessionDep
from service.errors import errors
from service.schemas import (
    MAX_OFFSET,
    RepoPublic,
    ReposPublic,
    RevisionPublic,
    RevisionsPublic,
)
from storage import revisions
from storage.db import begin_write

router = APIRouter(prefix="/v1/repos", tags=["repos"])

RepoName = Annotated[str, Path(description="The repository's name in your namespace.")]
RevRef = Annotated[
    str,
    Path(
        description="A ref name (main), a full 40-hex commit id, or a unique prefix of at "
        f"least {revisions.MIN_PREFIX} hex digits."
    ),
]


@router.get("", responses=errors())
def list_repos(
    session: SessionDep,
    namespace: NamespaceDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> ReposPublic:
    """Repositories of the namespace, by name, each with its ``main`` commit."""
    rows = revisions.list_repos(session, namespace=namespace, limit=limit, offset=offset)
    counts = revisions.revision_counts(session, rows)
    data = [RepoPublic.from_row(r, main=counts[r.id][0], revisions=counts[r.id][1]) for r in rows]
    return ReposPublic(data=data, count=len(data))


@router.get("/{name}", responses=errors(404))
def get_repo(name: RepoName, session: SessionDep, namespace: NamespaceDep) -> RepoPublic:
    """One repository."""
    row = revisions.get_repo(session, name=name, namespace=namespace)
    main, count = revisions.revision_counts(session, [row])[row.id]
    return RepoPublic.from_row(row, main=main, revisions=count)


@router.get("/{name}/revisions", responses=errors(404))
def list_revisions(
    name: RepoName,
    session: SessionDep,
    namespace: NamespaceDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> RevisionsPublic:
    """A repository's revisions, newest first: commit, parent, message, method, sizes,
    fidelity."""
    row = revisions.get_repo(session, name=name, namespace=namespace)
    rows = revisions.list_revisions(session, row, limit=limit, offset=offset)
    data = [
        RevisionPublic.from_row(i.revision, i.stored, i.refs)
        for i in revisions.describe(session, rows)
    ]
    return RevisionsPublic(data=data, count=len(data))


@router.get("/{name}/revisions/{rev}", responses=errors(400, 404))
def get_revision(
    name: RepoName, rev: RevRef, session: SessionDep, namespace: NamespaceDep
) -> RevisionPublic:
    """The revision ``rev`` names: its ``checkpoint_id`` (or ``base_id``) serves its files."""
    found = revisions.resolve_revision(session, namespace, name, rev)
    info = revisions.describe(session, [found])[0]
    return RevisionPublic.from_row(info.revision, info.stored, info.refs)


@router.delete("/{name}/revisions/{rev}", status_code=204, responses=errors(400, 404, 409))
def delete_revision(
    name: RepoName, rev: RevRef, session: SessionDep, namespace: NamespaceDep
) -> Response:
    """Delete one revision and its stored object (blobs go to GC); refs on it move to its
    parent (else the newest left). 409 for a base other checkpoints are stored against."""
    begin_write(session)
    found = revisions.resolve_revision(session, namespace, name, rev)
    revisions.delete_revision(session, found)
    session.commit()
    return Response(status_code=204)
