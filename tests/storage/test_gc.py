"""Garbage collection never removes referenced or young blobs, and removes the rest."""

from __future__ import annotations

import os
import time

from sqlalchemy import select
from storage_helpers import Database

from storage import repo
from storage.blobstore import BlobInfo, BlobStore, LocalBlobStore, S3BlobStore
from storage.gc import collect_garbage
from storage.models import Base, BaseState, Blob, FileRole

GRACE = 3600.0


def age(store: LocalBlobStore, key: str, seconds: float = 2 * GRACE) -> None:
    """Make a local object look ``seconds`` old."""
    path = store.root / key
    then = time.time() - seconds
    os.utime(path, (then, then))


def reference(db: Database, info: BlobInfo, path: str = "model.safetensors") -> None:
    with db.sessions.begin() as session:
        base = session.scalars(select(Base)).first()
        if base is None:
            base = Base(name="base", state=BaseState.READY)
            session.add(base)
            session.flush()
        repo.record_blob(session, info)
        repo.put_file(
            session,
            path=path,
            size=info.size,
            sha256=info.sha256,
            blob_key=info.key,
            role=FileRole.WEIGHTS,
            base_id=base.id,
        )


def blob_rows(db: Database) -> set[str]:
    with db.sessions() as session:
        return set(session.scalars(select(Blob.key)))


def stored(store: BlobStore) -> set[str]:
    return {entry.key for entry in store.list_keys("")}


def test_only_old_unreferenced_blobs_go(database: Database, local_store: LocalBlobStore) -> None:
    referenced = local_store.put_stream([b"referenced"])
    young = local_store.put_stream([b"young orphan"])
    old = local_store.put_stream([b"old orphan"])
    reference(database, referenced)
    with database.sessions.begin() as session:
        repo.record_blob(session, old)  # a row alone does not keep a blob alive
    age(local_store, referenced.key)
    age(local_store, old.key)

    report = collect_garbage(database.sessions, local_store, GRACE)

    assert stored(local_store) == {referenced.key, young.key}
    assert blob_rows(database) == {referenced.key}
    assert report.scanned == 3
    assert report.kept_referenced == 1
    assert report.kept_young == 1
    assert report.deleted_blobs == 1 and report.deleted_keys == [old.key]
    assert report.deleted_bytes == old.size
    assert report.deleted_rows == 1


def test_dry_run_deletes_nothing(database: Database, local_store: LocalBlobStore) -> None:
    old = local_store.put_stream([b"old orphan"])
    age(local_store, old.key)
    report = collect_garbage(database.sessions, local_store, GRACE, dry_run=True)
    assert report.deleted_keys == [old.key]
    assert stored(local_store) == {old.key}


def test_leftover_temporary_uploads_go_once_old(
    database: Database, local_store: LocalBlobStore
) -> None:
    leftover = local_store.root / "tmp" / "killed-upload.part"
    leftover.write_bytes(b"half an upload")
    collect_garbage(database.sessions, local_store, GRACE)
    assert leftover.exists()  # might be an upload in progress
    age(local_store, "tmp/killed-upload.part")
    collect_garbage(database.sessions, local_store, GRACE)
    assert not leftover.exists()


def test_rows_whose_object_is_gone_are_dropped(
    database: Database, local_store: LocalBlobStore
) -> None:
    info = local_store.put_stream([b"lost"])
    with database.sessions.begin() as session:
        row = repo.record_blob(session, info)
        row.created_at = row.created_at.replace(year=2000)
    local_store.delete(info.key)
    report = collect_garbage(database.sessions, local_store, GRACE)
    assert report.deleted_rows == 1
    assert blob_rows(database) == set()


def test_reupload_of_an_old_orphan_protects_it(
    database: Database, local_store: LocalBlobStore
) -> None:
    info = local_store.put_stream([b"deduplicated"])
    age(local_store, info.key)
    local_store.put_stream([b"deduplicated"])  # a new upload of the same bytes
    collect_garbage(database.sessions, local_store, GRACE)
    assert stored(local_store) == {info.key}


def test_blobs_of_deleted_checkpoints_are_collected(
    database: Database, local_store: LocalBlobStore
) -> None:
    base_file = local_store.put_stream([b"base"])
    ft_file = local_store.put_stream([b"fine-tune"])
    reference(database, base_file)
    with database.sessions.begin() as session:
        base = session.scalars(select(Base)).one()
        checkpoint = repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
        repo.record_blob(session, ft_file)
        repo.put_file(
            session,
            path="model.safetensors",
            size=ft_file.size,
            sha256=ft_file.sha256,
            blob_key=ft_file.key,
            role=FileRole.WEIGHTS,
            checkpoint_id=checkpoint.id,
        )
    for info in (base_file, ft_file):
        age(local_store, info.key)
    assert collect_garbage(database.sessions, local_store, GRACE).deleted_blobs == 0

    with database.sessions.begin() as session:
        repo.delete_checkpoint(session, checkpoint.id)
    report = collect_garbage(database.sessions, local_store, GRACE)
    assert report.deleted_keys == [ft_file.key]
    assert stored(local_store) == {base_file.key}


def test_s3_collection(database: Database, s3_store: S3BlobStore) -> None:
    referenced = s3_store.put_stream([b"referenced"])
    orphan = s3_store.put_stream([b"orphan"])
    reference(database, referenced)
    s3_store._client.create_multipart_upload(Bucket=s3_store.bucket, Key="tmp/abandoned")

    # Objects on moto cannot be back-dated: a grace of 0 makes everything written so far old.
    time.sleep(1.1)  # LastModified has one-second resolution
    report = collect_garbage(database.sessions, s3_store, 0)

    assert stored(s3_store) == {referenced.key}
    assert report.deleted_keys == [orphan.key]
    assert report.aborted_uploads == 1

    young = s3_store.put_stream([b"young"])
    collect_garbage(database.sessions, s3_store, GRACE)
    assert stored(s3_store) == {referenced.key, young.key}
