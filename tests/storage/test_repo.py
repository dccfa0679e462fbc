"""Repository functions and model constraints on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session
from storage_helpers import Database

from core.errors import InvalidPath
from core.files import check_path
from storage import queue, repo
from storage.blobstore import BlobInfo, blob_key
from storage.errors import AlreadyExists, Conflict, NotFound
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    File,
    FileRole,
    JobKind,
)


def blob(content: bytes) -> BlobInfo:
    digest = hashlib.sha256(content).hexdigest()
    return BlobInfo(key=blob_key(digest), sha256=digest, size=len(content))


def ready_base(session: Session, name: str = "llama", namespace: str = "default") -> Base:
    base = repo.create_base(session, name=name, namespace=namespace)
    base.state = BaseState.READY
    session.flush()
    return base


def add_file(
    session: Session, info: BlobInfo, path: str, *, base_id: str | None = None,
    checkpoint_id: str | None = None,
) -> File:  # fmt: skip
    repo.record_blob(session, info)
    return repo.put_file(
        session,
        path=path,
        size=info.size,
        sha256=info.sha256,
        blob_key=info.key,
        role=FileRole.WEIGHTS,
        base_id=base_id,
        checkpoint_id=checkpoint_id,
    )


def test_base_names_are_unique_per_namespace(database: Database) -> None:
    with database.sessions.begin() as session:
        first = repo.create_base(session, name="llama")
        with pytest.raises(AlreadyExists, match="pick another name"):
            repo.create_base(session, name="llama")
        other = repo.create_base(session, name="llama", namespace="team-b")
        assert first.id != other.id
        assert first.state == BaseState.UPLOADING
    with database.sessions() as session:
        assert [b.name for b in repo.list_bases(session)] == ["llama"]
        assert repo.find_base(session, name="llama", namespace="team-b") is not None
        assert repo.find_base(session, name="nope") is None


def test_lookups_respect_the_namespace(database: Database) -> None:
    with database.sessions.begin() as session:
        base_id = repo.create_base(session, name="llama", namespace="team-a").id
    with database.sessions() as session:
        assert repo.get_base(session, base_id, namespace="team-a").name == "llama"
        assert repo.get_base(session, base_id).name == "llama"
        with pytest.raises(NotFound):
            repo.get_base(session, base_id, namespace="team-b")
        with pytest.raises(NotFound):
            repo.get_base(session, "missing")


def test_checkpoints_need_a_ready_base(database: Database) -> None:
    with database.sessions.begin() as session:
        base = repo.create_base(session, name="llama")
        with pytest.raises(Conflict, match="commit it"):
            repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
        base.state = BaseState.READY
        checkpoint = repo.create_checkpoint(
            session, name="ft", base_id=base.id, method="nps", params={"keep": 0.1}
        )
        assert checkpoint.state == CheckpointState.UPLOADING
        with pytest.raises(AlreadyExists):
            repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
        with pytest.raises(NotFound):
            repo.create_checkpoint(
                session, name="x", base_id=base.id, method="nps", namespace="team-b"
            )
    with database.sessions() as session:
        (listed,) = repo.list_checkpoints(session, base_id=base.id)
        assert listed.params == {"keep": 0.1}
        assert repo.list_checkpoints(session, state=CheckpointState.READY) == []


def test_base_delete_is_refused_while_checkpoints_depend_on_it(database: Database) -> None:
    with database.sessions.begin() as session:
        base = ready_base(session)
        add_file(session, blob(b"base weights"), "model.safetensors", base_id=base.id)
        checkpoint = repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
    with (
        database.sessions.begin() as session,
        pytest.raises(Conflict, match="delete those checkpoints first"),
    ):
        repo.delete_base(session, base.id)
    with database.sessions.begin() as session:
        repo.delete_checkpoint(session, checkpoint.id)
        repo.delete_base(session, base.id)
    with database.sessions() as session:
        assert repo.list_bases(session) == []
        assert session.query(File).count() == 0  # file rows went with the base
        assert repo.referenced_blob_keys(session) == set()


def test_deleting_a_checkpoint_removes_its_files_and_jobs(database: Database) -> None:
    with database.sessions.begin() as session:
        base = ready_base(session)
        checkpoint = repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
        add_file(session, blob(b"ft"), "model.safetensors", checkpoint_id=checkpoint.id)
        queue.enqueue(session, JobKind.COMPRESS, checkpoint.id)
    with database.sessions.begin() as session:
        repo.delete_checkpoint(session, checkpoint.id)
        with pytest.raises(NotFound):
            repo.delete_checkpoint(session, checkpoint.id)
    with database.sessions() as session:
        assert queue.list_jobs(session) == []
        assert session.query(File).count() == 0


def test_a_failed_upload_lets_its_blobs_go(database: Database) -> None:
    with database.sessions.begin() as session:
        base = ready_base(session)
        add_file(session, blob(b"base"), "model.safetensors", base_id=base.id)
        checkpoint = repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
        add_file(session, blob(b"ft"), "model.safetensors", checkpoint_id=checkpoint.id)
        checkpoint.original_bytes = 2
        assert not repo.replaceable(checkpoint)  # uploading: maybe a push in progress
    with database.sessions.begin() as session:
        assert queue.fail_upload(session, checkpoint.id, "base_mismatch: other shapes")
    with database.sessions() as session:
        row = repo.get_checkpoint(session, checkpoint.id)
        assert row.state == CheckpointState.FAILED and row.error == "base_mismatch: other shapes"
        assert row.original_bytes == 0 and repo.list_files(session, checkpoint_id=row.id) == []
        assert repo.replaceable(row)
        keys = [blob(b"base").key, blob(b"ft").key]
        assert repo.referenced_blob_keys(session, among=keys) == {blob(b"base").key}
        row.state = CheckpointState.QUEUED  # committed meanwhile: not failed again
        session.commit()
    with database.sessions.begin() as session:
        assert not queue.fail_upload(session, checkpoint.id, "late")
        assert repo.get_checkpoint(session, checkpoint.id).state == CheckpointState.QUEUED


def test_put_file_replaces_the_row_at_the_same_path(database: Database) -> None:
    with database.sessions.begin() as session:
        base = ready_base(session)
        first = add_file(session, blob(b"v1"), "model.safetensors", base_id=base.id)
        second = add_file(session, blob(b"v2"), "model.safetensors", base_id=base.id)
        assert first.id == second.id
        add_file(session, blob(b"cfg"), "config.json", base_id=base.id)
    with database.sessions() as session:
        files = repo.list_files(session, base_id=base.id)
        assert [(f.path, f.sha256) for f in files] == [
            ("config.json", blob(b"cfg").sha256),
            ("model.safetensors", blob(b"v2").sha256),
        ]
        assert repo.get_file(session, path="config.json", base_id=base.id).size == 3
        with pytest.raises(NotFound):
            repo.get_file(session, path="missing.json", base_id=base.id)
        with pytest.raises(ValueError):
            repo.list_files(session)


def test_a_file_has_exactly_one_owner(database: Database) -> None:
    with database.sessions() as session:
        base = ready_base(session)
        checkpoint = repo.create_checkpoint(session, name="ft", base_id=base.id, method="nps")
        session.commit()
        with pytest.raises(ValueError):
            add_file(session, blob(b"x"), "a", base_id=base.id, checkpoint_id=checkpoint.id)
        session.add(
            File(
                base_id=base.id,
                checkpoint_id=checkpoint.id,
                path="both",
                size=1,
                sha256="0" * 64,
                role=FileRole.AUX,
            )
        )
        with pytest.raises(DbIntegrityError):  # the CHECK constraint, below the Python check
            session.flush()


def test_file_rows_need_their_blob_row(database: Database) -> None:
    with database.sessions() as session:
        base = ready_base(session)
        session.commit()
        info = blob(b"not recorded")
        with pytest.raises(DbIntegrityError):
            repo.put_file(
                session,
                path="model.safetensors",
                size=info.size,
                sha256=info.sha256,
                blob_key=info.key,
                role=FileRole.WEIGHTS,
                base_id=base.id,
            )


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../up", "a/../b", "a//b", "a/./b", "a\\b", "dir/", "nul\x00"]
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidPath):
        check_path(path)


@given(st.text(alphabet="ab./\\", max_size=12))
def test_accepted_paths_stay_inside_their_owner(path: str) -> None:
    try:
        check_path(path)
    except InvalidPath:
        return
    parts = PurePosixPath(path).parts
    assert parts and ".." not in parts and not PurePosixPath(path).is_absolute()
    assert "/".join(parts) == path


def test_record_blob_is_idempotent(database: Database) -> None:
    info = blob(b"weights")
    with database.sessions.begin() as session:
        first = repo.record_blob(session, info)
    with database.sessions.begin() as session:
        second = repo.record_blob(session, info)
        assert (second.key, second.size) == (first.key, first.size)


def test_timestamps_come_back_aware_utc(database: Database) -> None:
    with database.sessions.begin() as session:
        base_id = repo.create_base(session, name="llama").id
    with database.sessions() as session:
        base = repo.get_base(session, base_id)
        assert base.created_at.tzinfo is not None
        assert base.created_at.utcoffset() == UTC.utcoffset(None)
        assert abs((datetime.now(UTC) - base.created_at).total_seconds()) < 60
        base.created_at = datetime(2024, 1, 1, 12, 0)  # naive: refused
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


def test_stats_count_each_stored_blob_once(database: Database) -> None:
    shared = blob(b"tokenizer" * 10)
    with database.sessions.begin() as session:
        base = ready_base(session)
        base.total_bytes = 1000
        add_file(session, blob(b"base" * 100), "model.safetensors", base_id=base.id)
        add_file(session, shared, "tokenizer.json", base_id=base.id)
        for name in ("ft-1", "ft-2"):
            checkpoint = repo.create_checkpoint(session, name=name, base_id=base.id, method="nps")
            checkpoint.original_bytes = 1000
            add_file(session, shared, "tokenizer.json", checkpoint_id=checkpoint.id)
            delta = blob(name.encode() * 5)
            repo.record_blob(session, delta)
            checkpoint.delta_blob_key = delta.key
            checkpoint.state = CheckpointState.READY
            queue.enqueue(session, JobKind.COMPRESS, checkpoint.id)
        other = ready_base(session, name="other", namespace="team-b")
        other.total_bytes = 7
        add_file(session, blob(b"other"), "model.safetensors", base_id=other.id)
        repo.record_blob(session, blob(b"orphan, referenced by nothing"))

    with database.sessions() as session:
        totals = repo.stats(session, namespace="default")
        assert totals.logical_bytes == 3000
        assert totals.stored_bytes == 400 + 90 + 20 + 20
        assert totals.num_blobs == 4
        assert (totals.num_bases, totals.num_checkpoints) == (1, 2)
        assert totals.checkpoints_by_state == {"ready": 2}
        assert totals.jobs_by_state == {"queued": 2}
        assert totals.ratio == pytest.approx(3000 / 530)

        everything = repo.stats(session)
        assert everything.logical_bytes == 3007
        assert everything.stored_bytes == 530 + 5
        assert everything.num_bases == 2

        assert repo.stats(session, namespace="empty") == repo.Stats()
        assert len(repo.referenced_blob_keys(session)) == 5


def test_stored_bytes_are_split_by_what_they_keep_and_count_each_blob_once(
    database: Database,
) -> None:
    """One definition of stored bytes: the parts (bases, deltas, retained originals, pending
    uploads, failed jobs) add up to the total, a shared blob counts once (under its first
    part), per base and per checkpoint alike."""
    shared = blob(b"tokenizer" * 10)  # 90 B, in the base and in every checkpoint
    with database.sessions.begin() as session:
        base = ready_base(session)
        add_file(session, blob(b"base" * 100), "model.safetensors", base_id=base.id)  # 400
        add_file(session, shared, "tokenizer.json", base_id=base.id)
        ids = {}
        for name, state, upload, delta in [
            ("ready", CheckpointState.READY, None, b"d" * 30),
            ("kept", CheckpointState.READY, b"kept" * 10, b"e" * 31),
            ("queued", CheckpointState.QUEUED, b"queued" * 10, None),
            ("failed", CheckpointState.FAILED, b"fail" * 2, None),
        ]:
            checkpoint = repo.create_checkpoint(session, name=name, base_id=base.id, method="nps")
            add_file(session, shared, "tokenizer.json", checkpoint_id=checkpoint.id)
            if upload is not None:
                add_file(session, blob(upload), "model.safetensors", checkpoint_id=checkpoint.id)
            if delta is not None:
                info = blob(delta)
                repo.record_blob(session, info)
                checkpoint.delta_blob_key = info.key
            checkpoint.state = state
            ids[name] = checkpoint.id
        other = ready_base(session, name="other")
        add_file(session, shared, "tokenizer.json", base_id=other.id)

    with database.sessions() as session:
        whole = repo.stored_bytes(session, namespace="default")
        assert whole.parts == {
            "bases": 400 + 90,
            "deltas": 30 + 31,
            "retained": 40,
            "pending": 60,
            "failed": 8,
        }
        assert whole.total == 400 + 90 + 61 + 40 + 60 + 8 and whole.num_blobs == 7
        totals = repo.stats(session, namespace="default")
        assert totals.stored_bytes == whole.total and totals.stored_parts == whole.parts
        assert totals.num_blobs == 7
        assert set(repo.STORED_PART_LABELS) == set(whole.parts)

        by_base = repo.stored_bytes_by_base(session, namespace="default")
        assert by_base[base.id].total == whole.total
        assert by_base[other.id].parts["bases"] == 90 and by_base[other.id].total == 90

        by_ckpt = repo.stored_bytes_by_checkpoint(session, list(ids.values()))
        # the shared tokenizer is an upload of each checkpoint until its originals go
        assert by_ckpt[ids["ready"]].parts["deltas"] == 30
        assert by_ckpt[ids["ready"]].total == 30 + 90
        assert by_ckpt[ids["kept"]].parts == {**_zero(), "deltas": 31, "retained": 40 + 90}
        assert by_ckpt[ids["queued"]].total == 60 + 90
        assert by_ckpt[ids["failed"]].parts["failed"] == 8 + 90
        assert repo.stored_bytes_by_checkpoint(session, []) == {}
        assert repo.stored_bytes(session, namespace="empty").total == 0


def _zero() -> dict[str, int]:
    return {part.value: 0 for part in repo.StoredPart}


def test_models_default_sensibly(database: Database) -> None:
    with database.sessions.begin() as session:
        base = Base(name="b", state=BaseState.READY)
        session.add(base)
        session.flush()
        checkpoint = Checkpoint(name="c", base_id=base.id, method="lossless")
        session.add(checkpoint)
        session.flush()
        assert checkpoint.namespace == "default"
        assert checkpoint.state == CheckpointState.UPLOADING
        assert checkpoint.params == {}
        assert len(checkpoint.id) == 36
