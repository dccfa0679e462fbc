"""The rows of an upload: whether a base or checkpoint still takes files, and recording one.

A file's bytes are streamed into the blob store first (``service.uploads``); only then is its
row written here, in one write transaction that checks again that the owner still takes files,
so a commit that raced the upload wins and the late file is refused.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage import repo
from storage.blob_common import BlobInfo
from storage.db import write_transaction
from storage.errors import Conflict, TooManyFiles
from storage.models import BaseState, File, FileRole
from storage.repo import OPEN_CHECKPOINT_STATES


def check_base_open(session: Session, base_id: str, namespace: str) -> None:
    """Refuse files for a committed base.

    Raises:
        NotFound: no such base in the namespace.
        Conflict: the base is committed.
    """
    base = repo.get_base(session, base_id, namespace=namespace)
    if base.state != BaseState.UPLOADING:
        raise Conflict(
            f"base {base.name!r} is committed and its files are fixed; create a new base "
            "to store other weights"
        )


def check_checkpoint_open(
    session: Session, checkpoint_id: str, namespace: str, path: str, max_files: int
) -> None:
    """Refuse files for a committed (or derived) checkpoint, and a new path past ``max_files``.

    Raises:
        NotFound: no such checkpoint in the namespace.
        Conflict: the checkpoint is committed or derived.
        TooManyFiles: ``path`` would be file number ``max_files + 1``.
    """
    ckpt = repo.get_checkpoint(session, checkpoint_id, namespace=namespace)
    if ckpt.state not in OPEN_CHECKPOINT_STATES or ckpt.derived_from is not None:
        raise Conflict(
            f"checkpoint {ckpt.name!r} is {ckpt.state.value}; files can only be added before "
            "it is committed (create a new checkpoint for other weights)"
        )
    count = session.scalar(
        select(func.count()).select_from(File).where(File.checkpoint_id == checkpoint_id)
    )
    exists = session.scalar(
        select(func.count())
        .select_from(File)
        .where(File.checkpoint_id == checkpoint_id, File.path == path)
    )
    if not exists and (count or 0) >= max_files:
        raise TooManyFiles(
            f"a checkpoint holds at most {max_files} files; pack the extra files or ask for a "
            "higher SLIM_MAX_FILES_PER_CHECKPOINT"
        )


def record_upload(
    sessions: sessionmaker[Session],
    info: BlobInfo,
    *,
    path: str,
    role: FileRole,
    namespace: str,
    base_id: str | None = None,
    checkpoint_id: str | None = None,
    max_files: int,
) -> File:
    """Write the blobs row and the file row (replacing one at the same path) in one
    transaction, after checking again that the owner still takes files."""
    with sessions() as session, write_transaction(session):
        if base_id is not None:
            check_base_open(session, base_id, namespace)
        else:
            assert checkpoint_id is not None
            check_checkpoint_open(session, checkpoint_id, namespace, path, max_files)
        repo.record_blob(session, info)
        return repo.put_file(
            session,
            path=path,
            size=info.size,
            sha256=info.sha256,
            blob_key=info.key,
            role=role,
            base_id=base_id,
            checkpoint_id=checkpoint_id,
        )
