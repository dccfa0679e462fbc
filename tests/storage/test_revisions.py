"""Repositories and revisions (storage.revisions) on SQLite and PostgreSQL: resolving a revision
by ref, full commit id and prefix; the parent check; immutability; deletes and retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from storage_helpers import Database

from core.files import manifest_sha256
from storage import queue, repo, revisions
from storage.blobstore import LocalBlobStore
from storage.errors import AlreadyExists, Conflict
from storage.gc import collect_garbage
from storage.models import Base, Checkpoint, CheckpointState, FileRole, Revision
from storage.revisions import (
    AmbiguousRevision,
    ParentMismatch,
    RepoNotFound,
    RevisionNotFound,
)

NS = "default"


def ready_base(session, name: str = "b") -> Base:  # type: ignore[no-untyped-def]
    base = repo.create_base(session, name=name)
    session.flush()
    return queue.ready_base(base, total_bytes=0, num_params=0, manifest_sha256="0" * 64)


def revision_of(session, base: Base, name: str, digest: str) -> Revision:  # type: ignore[no-untyped-def]
    """A checkpoint of ``name`` with one file, made ready and added as a revision."""
    ckpt = repo.create_checkpoint(session, name=name, base_id=base.id, method="lossless")
    repo.put_file(
        session,
        path="model.safetensors",
        size=4,
        sha256=digest,
        blob_key=None,
        role=FileRole.WEIGHTS,
        checkpoint_id=ckpt.id,
    )
    ckpt.state = CheckpointState.READY
    holder = revisions.get_repo(session, name=name, namespace=NS)
    return revisions.add_revision(
        session,
        holder,
        manifest_sha256=manifest_sha256([("model.safetensors", digest)]),
        message=f"push {digest[:4]}",
        checkpoint_id=ckpt.id,
    )


def test_second_revision_has_a_parent_and_main_moves(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        two = revision_of(s, base, "ft", "b" * 64)
        assert len(one.commit_id) == 40 and int(one.commit_id, 16) >= 0
        assert one.parent_commit is None and two.parent_commit == one.commit_id
        assert (one.number, two.number) == (1, 2)
        assert revisions.resolve_revision(s, NS, "ft", "main").id == two.id
        assert [r.id for r in revisions.list_revisions(s, revisions.get_repo(s, name="ft"))] == [
            two.id,
            one.id,
        ]
        # The name means main's checkpoint.
        assert repo.get_checkpoint(s, "ft", namespace=NS).id == two.checkpoint_id


def test_resolve_by_full_id_prefix_and_errors(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        revision_of(s, base, "ft", "b" * 64)
        assert revisions.resolve_revision(s, NS, "ft", one.commit_id).id == one.id
        assert revisions.resolve_revision(s, NS, "ft", one.commit_id.upper()).id == one.id
        assert revisions.resolve_revision(s, NS, "ft", one.commit_id[:7]).id == one.id
        with pytest.raises(RevisionNotFound):
            revisions.resolve_revision(s, NS, "ft", one.commit_id[:6])  # too short
        with pytest.raises(RevisionNotFound):
            revisions.resolve_revision(s, NS, "ft", "0" * 40)
        with pytest.raises(RevisionNotFound):
            revisions.resolve_revision(s, NS, "ft", "dev")
        with pytest.raises(RepoNotFound):
            revisions.resolve_revision(s, NS, "nope", "main")
        with pytest.raises(RepoNotFound):
            revisions.resolve_revision(s, "other", "ft", "main")  # another namespace's


def test_an_ambiguous_prefix_is_refused(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        made = [revision_of(s, base, "ft", f"{i:064x}") for i in range(40)]
        # Among 40 ids some pair shares its first hex digit; force a 7-digit clash by
        # rewriting one id (the column is unique, not the prefix).
        made[1].commit_id = made[0].commit_id[:7] + "f" * 33
        if made[1].commit_id == made[0].commit_id:
            made[1].commit_id = made[0].commit_id[:7] + "e" * 33
        s.flush()
        with pytest.raises(AmbiguousRevision, match="more digits"):
            revisions.resolve_revision(s, NS, "ft", made[0].commit_id[:7])
        assert revisions.resolve_revision(s, NS, "ft", made[0].commit_id).id == made[0].id


def test_parent_check(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        holder = revisions.get_repo(s, name="ft")
        ckpt = repo.create_checkpoint(s, name="ft", base_id=base.id, method="lossless")
        with pytest.raises(ParentMismatch):
            revisions.add_revision(
                s,
                holder,
                manifest_sha256="c" * 64,
                message="x",
                checkpoint_id=ckpt.id,
                expected_parent=None,  # as if main did not exist yet
            )
        two = revisions.add_revision(
            s,
            holder,
            manifest_sha256="c" * 64,
            message="x",
            checkpoint_id=ckpt.id,
            expected_parent=one.commit_id,
        )
        assert two.parent_commit == one.commit_id
        assert ParentMismatch.code == "parent_mismatch" and issubclass(ParentMismatch, Conflict)


def test_one_push_in_flight_per_repo_and_kinds_do_not_share_names(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        repo.create_checkpoint(s, name="ft", base_id=base.id, method="lossless")
        with pytest.raises(AlreadyExists, match="in flight"):
            repo.create_checkpoint(s, name="ft", base_id=base.id, method="lossless")
        with pytest.raises(AlreadyExists, match="fine-tune"):
            repo.create_base(s, name="ft")
        with pytest.raises(AlreadyExists, match="a base"):
            repo.create_checkpoint(s, name="b", base_id=base.id, method="lossless")


def test_a_revision_is_immutable(database: Database) -> None:
    """A revision's files are those of its stored object; its commit id names them."""
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        revision_of(s, base, "ft", "b" * 64)
        files = repo.list_files(s, checkpoint_id=one.checkpoint_id)
        assert manifest_sha256((f.path, f.sha256) for f in files) == one.manifest_sha256
        again = revisions.resolve_revision(s, NS, "ft", one.commit_id)
        assert (again.checkpoint_id, again.manifest_sha256) == (
            one.checkpoint_id,
            one.manifest_sha256,
        )
        with pytest.raises(ValueError):
            revisions.add_revision(
                s, revisions.get_repo(s, name="ft"), manifest_sha256="0" * 64, message=""
            )


def test_delete_moves_main_to_the_parent_and_drops_an_empty_repo(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        two = revision_of(s, base, "ft", "b" * 64)
        two_ckpt = two.checkpoint_id
        repo.delete_checkpoint(s, "ft", namespace=NS)  # main's
        assert s.get(Checkpoint, two_ckpt) is None
        assert revisions.resolve_revision(s, NS, "ft", "main").id == one.id
        revisions.delete_revision(s, one)
        assert revisions.find_repo(s, name="ft") is None
        # The base's revision is refused while a checkpoint depends on the base.
        revision_of(s, base, "ft2", "c" * 64)
        with pytest.raises(Conflict):
            revisions.delete_revision(s, revisions.resolve_revision(s, NS, "b", "main"))


def test_move_ref(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        revision_of(s, base, "ft", "b" * 64)
        holder = revisions.get_repo(s, name="ft")
        revisions.move_ref(s, holder, "stable", one.commit_id[:8])
        assert revisions.resolve_revision(s, NS, "ft", "stable").id == one.id
        with pytest.raises(ValueError):
            revisions.move_ref(s, holder, "abcdef12", "main")  # reads as a commit prefix


def test_retention_expires_old_unreferenced_revisions(database: Database) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        two = revision_of(s, base, "ft", "b" * 64)
        three = revision_of(s, base, "ft", "c" * 64)
        revisions.move_ref(s, revisions.get_repo(s, name="ft"), "pinned", two.commit_id)
        later = datetime.now(UTC) + timedelta(days=30)
        assert revisions.expire_revisions(s, older_than=None, now=later) == []  # the default
        assert revisions.expire_revisions(s, older_than=timedelta(days=60), now=later) == []
        gone = revisions.expire_revisions(s, older_than=timedelta(days=1), now=later)
        assert gone == [one.commit_id]  # two is pinned, three is main, the base has dependents
        left = s.scalars(select(Revision.commit_id)).all()
        assert set(left) == {
            two.commit_id,
            three.commit_id,
            revisions.resolve_revision(s, NS, "b").commit_id,
        }


def test_garbage_collection_applies_the_retention_setting(
    database: Database, tmp_path: Path
) -> None:
    with database.sessions.begin() as s:
        base = ready_base(s)
        one = revision_of(s, base, "ft", "a" * 64)
        revision_of(s, base, "ft", "b" * 64)
        one.created_at = datetime.now(UTC) - timedelta(days=10)
        old = one.commit_id
    store = LocalBlobStore(tmp_path / "blobs")
    kept = collect_garbage(database.sessions, store, 0)  # default: keep every revision
    assert kept.expired_revisions == []
    report = collect_garbage(database.sessions, store, 0, retention_seconds=86400)
    assert report.expired_revisions == [old]
    with database.sessions() as s:
        assert [
            r.number for r in revisions.list_revisions(s, revisions.get_repo(s, name="ft"))
        ] == [2]
