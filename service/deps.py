"""Route dependencies: ``Annotated`` aliases for the runtime, a database session and the caller.

``NamespaceDep`` is where authentication plugs in: it checks the caller's API key
(``Authorization: Bearer``; see :mod:`service.auth`) with the role the HTTP method needs
(``read`` for GET/HEAD, ``write`` otherwise) and answers with the key's namespace, which every
route passes to every repository call — rows of other namespaces answer 404.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from runtime.process import Runtime
from runtime.settings import Settings
from service.auth import CallerDep
from storage.blobstore import BlobStore
from storage.db import begin_write

log = logging.getLogger("slim.service")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(request: Request, runtime: RuntimeDep) -> Iterator[Session]:
    """A session per request; routes commit what they change, the rest is rolled back.

    Requests that may write begin with a write transaction (see :mod:`storage.db`). Closing
    runs after the answer has been decided (often sent): if the database went away meanwhile,
    the rollback of a dead connection fails — that changes nothing stored, so it is logged and
    swallowed instead of breaking an answer already on its way."""
    session = runtime.sessions()
    try:
        if request.method not in ("GET", "HEAD"):
            begin_write(session)
        yield session
    finally:
        try:
            session.close()
        except DBAPIError as exc:
            log.info("closing a request's session failed (database gone?): %s", exc.orig)


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_store(runtime: RuntimeDep) -> BlobStore:
    return runtime.store


def get_namespace(caller: CallerDep) -> str:
    """The namespace of the caller's key (401 without a valid key, 403 if its role is too low
    for the method)."""
    return caller.namespace


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
NamespaceDep = Annotated[str, Depends(get_namespace)]

#: Path parameters that name a base or a checkpoint: an id or a name (``storage.repo``'s rule).
BaseRef = Annotated[str, Path(description="The base's id, or its name in your namespace.")]
CheckpointRef = Annotated[
    str, Path(description="The checkpoint's id, or its name in your namespace.")
]
