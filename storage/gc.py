"""Garbage collection: remove blobs that no row points at.

Blobs are written before the rows that point at them are committed (ARCHITECTURE §4), so a
failed or killed upload or job leaves orphans behind, and deleting a base or checkpoint leaves
its blobs unreferenced. :func:`collect_garbage` removes them, but only once they are older
than a grace period: an upload in progress, or a blob stored a moment ago whose row is not yet
committed, is young and kept.

Dedup and GC: re-uploading content that is already stored refreshes the stored object's
modification time (see the stores' ``put_stream``), and each object is checked again just
before it is deleted, so a blob that a new row is about to reference is not deleted from under
it. The grace period must be longer than the slowest upload-to-commit gap and, for
``S3BlobStore``, longer than its ``dedup_refresh_seconds``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from storage.blob_common import BlobEntry
from storage.blobstore import BlobStore
from storage.db import begin_write, write_transaction
from storage.errors import StorageError
from storage.models import Blob
from storage.repo import referenced_blob_keys, unreferenced_blob_condition
from storage.revisions import expire_revisions

_BATCH = 500
log = logging.getLogger("slim.gc")


@dataclass(slots=True)
class GcReport:
    """What one collection did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    scanned: int = 0
    kept_referenced: int = 0
    kept_young: int = 0
    deleted_blobs: int = 0
    deleted_bytes: int = 0
    deleted_rows: int = 0
    aborted_uploads: int = 0
    deleted_keys: list[str] = field(default_factory=list)
    expired_revisions: list[str] = field(default_factory=list)


def collect_garbage(
    session_factory: sessionmaker[Session],
    store: BlobStore,
    grace_seconds: float = 3600,
    *,
    dry_run: bool = False,
    retention_seconds: float | None = None,
) -> GcReport:
    """Delete stored objects and ``blobs`` rows that nothing references.

    An object goes when no file or checkpoint row points at its key and it was last modified
    more than ``grace_seconds`` ago (temporary uploads under ``tmp/`` included). A ``blobs``
    row goes with its object, or on its own when its object is already gone. Unfinished S3
    multipart uploads older than the grace period are aborted.

    Args:
        session_factory: makes the sessions GC reads and deletes rows with.
        store: the blob store to sweep.
        grace_seconds: minimum age of anything deleted.
        dry_run: report what would be deleted, delete nothing.
        retention_seconds: first expire the revisions older than this that no ref points at
            (:func:`storage.revisions.expire_revisions`; None keeps every revision); their
            blobs then go like any other unreferenced ones, after the grace period.
    """
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_seconds)
    report = GcReport(dry_run=dry_run)
    if retention_seconds is not None and not dry_run:
        with session_factory() as session, write_transaction(session):
            report.expired_revisions = expire_revisions(
                session, older_than=timedelta(seconds=retention_seconds)
            )
    entries = store.list_keys("")
    while batch := list(itertools.islice(entries, _BATCH)):
        report.scanned += len(batch)
        with session_factory() as session:
            referenced = referenced_blob_keys(session, among=[entry.key for entry in batch])
        for entry in batch:
            if entry.key in referenced:
                report.kept_referenced += 1
            elif entry.last_modified >= cutoff:
                report.kept_young += 1
            else:
                deleted, rows = _delete_object(session_factory, store, entry, cutoff, dry_run)
                report.deleted_rows += rows
                if deleted:
                    report.deleted_blobs += 1
                    report.deleted_bytes += entry.size
                    report.deleted_keys.append(entry.key)
    report.deleted_rows += _delete_orphan_rows(session_factory, store, cutoff, dry_run)
    if not dry_run:
        report.aborted_uploads = store.cleanup_incomplete(cutoff)
    return report


def drop_blobs(
    sessions: sessionmaker[Session],
    store: BlobStore,
    keys: Iterable[str],
    *,
    unchanged_since: datetime,
) -> None:
    """Delete blobs nothing references any more, now rather than after the grace period (the
    originals a compression replaced). A blob that another upload refreshed (a dedup hit) since
    ``unchanged_since`` is left to garbage collection, and so is one a failure stops at."""
    for key in sorted(keys):
        try:
            with sessions() as session:
                begin_write(session)
                if referenced_blob_keys(session, among=[key]):
                    continue
                modified = store.last_modified(key)
                if modified is not None and modified > unchanged_since:
                    continue
                session.execute(delete(Blob).where(Blob.key == key, unreferenced_blob_condition()))
                session.commit()
                if referenced_blob_keys(session, among=[key]):
                    continue
            store.delete(key)
        except (SQLAlchemyError, StorageError) as exc:  # GC will finish the job
            log.warning("could not drop blob %s (GC will): %s", key, exc)


def _delete_object(
    session_factory: sessionmaker[Session],
    store: BlobStore,
    entry: BlobEntry,
    cutoff: datetime,
    dry_run: bool,
) -> tuple[bool, int]:
    """Delete one unreferenced old object and its row, after checking both again.

    Returns whether the object was deleted and how many rows were.
    """
    with session_factory() as session:
        if not dry_run:
            # the write lock first: a read transaction that later writes can fail at once
            # ("database is locked") on SQLite when another writer committed meanwhile
            begin_write(session)
        if referenced_blob_keys(session, among=[entry.key]):
            return False, 0
        last_modified = store.last_modified(entry.key)
        if last_modified is None or last_modified >= cutoff:  # gone, or refreshed by a dedup
            return False, 0
        if dry_run:
            return True, int(session.get(Blob, entry.key) is not None)
        # One statement, so a row that gains a reference meanwhile is not deleted.
        result = session.execute(
            delete(Blob).where(Blob.key == entry.key, unreferenced_blob_condition())
        )
        rows = cast(CursorResult[Any], result).rowcount
        session.commit()
        if referenced_blob_keys(session, among=[entry.key]):
            return False, rows
    store.delete(entry.key)
    return True, rows


def _delete_orphan_rows(
    session_factory: sessionmaker[Session], store: BlobStore, cutoff: datetime, dry_run: bool
) -> int:
    """Delete old unreferenced ``blobs`` rows whose object is missing from the store."""
    deleted = 0
    with session_factory() as session:
        keys = list(
            session.scalars(
                select(Blob.key).where(Blob.created_at < cutoff, unreferenced_blob_condition())
            )
        )
        for key in keys:
            if store.head(key) is not None:
                continue  # young object (kept above) or one that appeared meanwhile
            if not dry_run:
                begin_write(session)
                session.execute(delete(Blob).where(Blob.key == key, unreferenced_blob_condition()))
                session.commit()
            deleted += 1
    return deleted


def gc_loop(
    session_factory: sessionmaker[Session],
    store: BlobStore,
    *,
    grace_seconds: float,
    interval_seconds: float,
    stop: threading.Event,
    retention_seconds: float | None = None,
) -> None:
    """Run :func:`collect_garbage` every ``interval_seconds`` until ``stop`` is set.

    The first run comes one interval after the start (a process restarting in a loop does not
    sweep every time). Failures (database or object store down) are logged and retried at the
    next interval; several processes may run this at once (each deletion is re-checked).
    """
    while not stop.wait(interval_seconds):
        try:
            report = collect_garbage(
                session_factory, store, grace_seconds, retention_seconds=retention_seconds
            )
        except Exception:  # keep the loop alive; the next round tries again
            log.warning("periodic garbage collection failed; retrying later", exc_info=True)
            continue
        if report.deleted_blobs or report.deleted_rows or report.aborted_uploads:
            log.info(
                "gc: deleted %d blobs (%d bytes), %d rows, aborted %d uploads",
                report.deleted_blobs,
                report.deleted_bytes,
                report.deleted_rows,
                report.aborted_uploads,
            )


def start_gc_thread(
    session_factory: sessionmaker[Session],
    store: BlobStore,
    *,
    grace_seconds: float,
    interval_seconds: float,
    stop: threading.Event,
    retention_seconds: float | None = None,
) -> threading.Thread | None:
    """Start :func:`gc_loop` in a daemon thread (None when ``interval_seconds`` is 0)."""
    if interval_seconds <= 0:
        return None
    thread = threading.Thread(
        target=gc_loop,
        args=(session_factory, store),
        kwargs={
            "grace_seconds": grace_seconds,
            "interval_seconds": interval_seconds,
            "stop": stop,
            "retention_seconds": retention_seconds,
        },
        name="slim-gc",
        daemon=True,
    )
    thread.start()
    return thread
