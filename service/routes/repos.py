"""``/v1/repos``: repositories and their revisions (history, one revision, delete one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from sqlalchemy.orm import Session

from core.errors import InvalidArgument
from core.files import check_path
from core.params import VALUE_BITS, Method
from service import hub_write
from service.deps import NamespaceDep, RuntimeDep, SessionDep
from service.errors import errors
from service.operations import available_methods
from service.schemas import (
    MAX_OFFSET,
    PolicyBody,
    RepoCreate,
    RepoPublic,
    ReposPublic,
    RepoUpdate,
    RevisionPublic,
    RevisionsPublic,
)
from storage import commits, revisions
from storage.db import begin_write
from storage.models import Repo

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


def _policy(body: PolicyBody | None, current: dict | None = None) -> dict:
    """The policy row of a request (fields not given keep their current value)."""
    row = hub_write.Policy.from_row(current).to_row()
    if body is None:
        return row
    given = body.model_dump(exclude_none=True)
    method = given.get("method")
    if method is not None and method not in available_methods():
        methods = ", ".join(available_methods())
        raise InvalidArgument(f"unknown method {method!r}; choose one of {methods}")
    if body.value_bits is not None and body.value_bits not in VALUE_BITS:
        raise InvalidArgument(f"value_bits must be one of {VALUE_BITS}")
    if body.calibration_file is not None:
        check_path(body.calibration_file)
    row |= given
    if row["method"] == Method.AUTO and (row["keep"] or row["value_bits"]):
        raise InvalidArgument("keep and value_bits go with a method other than 'auto'")
    return row


def _base_id(session: Session, namespace: str, base: str | None) -> str | None:
    if base is None:
        return None
    return commits.base_of_repo(session, namespace=namespace, name=base).id


def _public(session: Session, row: Repo) -> RepoPublic:
    main, count = revisions.revision_counts(session, [row])[row.id]
    return RepoPublic.from_row(row, main=main, revisions=count)


@router.post("", status_code=201, responses=errors(400, 404, 409))
def create_repo(
    body: RepoCreate, runtime: RuntimeDep, session: SessionDep, namespace: NamespaceDep
) -> RepoPublic:
    """A repository for pushes through the Hub protocol (``slim repo create``): its first
    commit holds ``.gitattributes``; ``base`` (a repository holding a base) is what pushes are
    stored against when their model card names none; ``policy`` what they are compressed to."""
    name = hub_write.check_repo_name(body.name)
    base_id = _base_id(session, namespace, body.base)
    policy = _policy(body.policy)
    session.rollback()
    hub_write.new_repo(runtime, namespace, name, base_id=base_id, policy=policy)
    return _public(session, revisions.get_repo(session, name=name, namespace=namespace))


@router.patch("/{name}", responses=errors(400, 404))
def update_repo(
    name: RepoName, body: RepoUpdate, session: SessionDep, namespace: NamespaceDep
) -> RepoPublic:
    """Change a repository's base or policy (``slim repo set``); later pushes follow it."""
    begin_write(session)
    row = revisions.get_repo(session, name=name, namespace=namespace)
    if body.base is not None:
        row.base_id = _base_id(session, namespace, body.base)
    if body.policy is not None:
        row.policy = _policy(body.policy, row.policy)
    session.commit()
    return _public(session, row)


@router.get("/{name}", responses=errors(404))
def get_repo(name: RepoName, session: SessionDep, namespace: NamespaceDep) -> RepoPublic:
    """One repository."""
    return _public(session, revisions.get_repo(session, name=name, namespace=namespace))


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
