"""Scrub: read back everything stored and check it against the hashes recorded at write time.

:func:`scrub` checks, for every object under ``sha256/`` and every key a row points at:

1. the object exists (a row pointing at nothing is ``missing``);
2. its bytes hash to the sha256 its content key names, and match the ``blobs`` row's size and
   sha256 (else ``corrupt``);
3. for every checkpoint's delta: the container and its document parse, and every frame
   matches the sha256 the document records (else ``invalid_delta`` / ``corrupt_frame``), and
   the file rows' ``recon_sha256`` agree with the document (else ``mismatch``).

Nothing is repaired: the report names each problem, the key and the rows that use it, so an
operator can restore the object from a replica or re-upload the model. ``slim scrub`` prints
the report as JSON and exits 1 when it found anything.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.delta_format import DeltaReader
from core.errors import SlimError
from storage.blob_common import sha256_of_key
from storage.blobstore import BlobStore
from storage.errors import BlobNotFound, StorageError
from storage.models import Blob, Checkpoint, File


@dataclass(slots=True)
class ScrubProblem:
    """One thing found wrong: what, under which key, and which rows use that key."""

    kind: str  # missing | corrupt | invalid_delta | corrupt_frame | mismatch
    key: str
    detail: str
    used_by: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ScrubReport:
    """What a scrub read and what it found."""

    objects_checked: int = 0
    bytes_checked: int = 0
    deltas_checked: int = 0
    frames_checked: int = 0
    problems: list[ScrubProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def scrub(
    session_factory: sessionmaker[Session],
    store: BlobStore,
    *,
    deltas: bool = True,
    scratch_dir: Path | None = None,
) -> ScrubReport:
    """Check every stored object and every delta; see the module docstring.

    Args:
        session_factory: sessions of the metadata database.
        store: the blob store to read.
        deltas: also open every checkpoint's delta and check its frames.
        scratch_dir: where S3 deltas are downloaded for the frame check (default: a temp dir).
    """
    report = ScrubReport()
    with session_factory() as session:
        users = _users(session)
        rows = {b.key: (b.sha256, b.size) for b in session.scalars(select(Blob))}
        delta_rows = [
            (c.id, c.name, c.delta_blob_key)
            for c in session.scalars(
                select(Checkpoint).where(Checkpoint.delta_blob_key.is_not(None))
            )
        ]
    listed = {entry.key for entry in store.list_keys("sha256/")}
    for key in sorted(listed | set(users) | set(rows)):
        _check_object(store, key, rows.get(key), users.get(key, []), report)
    if deltas:
        with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp:
            for ckpt_id, name, delta_key in delta_rows:
                key = str(delta_key)
                if any(p.key == key for p in report.problems):
                    continue  # already reported (missing or corrupt)
                _check_delta(session_factory, store, ckpt_id, name, key, Path(tmp), report)
    return report


def _users(session: Session) -> dict[str, list[str]]:
    users: dict[str, list[str]] = defaultdict(list)
    for path, key, base_id, ckpt_id in session.execute(
        select(File.path, File.blob_key, File.base_id, File.checkpoint_id).where(
            File.blob_key.is_not(None)
        )
    ):
        owner = f"base {base_id}" if base_id else f"checkpoint {ckpt_id}"
        users[str(key)].append(f"{owner} file {path}")
    for ckpt_id, key in session.execute(
        select(Checkpoint.id, Checkpoint.delta_blob_key).where(
            Checkpoint.delta_blob_key.is_not(None)
        )
    ):
        users[str(key)].append(f"checkpoint {ckpt_id} delta")
    return users


def _check_object(
    store: BlobStore,
    key: str,
    row: tuple[str, int] | None,
    used_by: list[str],
    report: ScrubReport,
) -> None:
    want = sha256_of_key(key)
    h = hashlib.sha256()
    size = 0
    try:
        for chunk in store.open_range(key):
            h.update(chunk)
            size += len(chunk)
    except BlobNotFound:
        if used_by:  # an unreferenced row without its object is GC's business
            report.problems.append(
                ScrubProblem(
                    "missing",
                    key,
                    "a row points at this key but nothing is stored "
                    "there; restore the object or re-upload the file",
                    used_by,
                )
            )
        return
    except StorageError as exc:
        report.problems.append(ScrubProblem("unreadable", key, str(exc), used_by))
        return
    report.objects_checked += 1
    report.bytes_checked += size
    digest = h.hexdigest()
    if want is not None and digest != want:
        report.problems.append(
            ScrubProblem(
                "corrupt",
                key,
                f"the object hashes to {digest}, not the sha256 its key names; restore it "
                "from a replica or re-upload the file",
                used_by,
            )
        )
    elif row is not None and (row[0] != digest or row[1] != size):
        report.problems.append(
            ScrubProblem(
                "corrupt",
                key,
                f"the blobs row records sha256 {row[0]} and {row[1]} bytes; the object has "
                f"{digest} and {size} bytes",
                used_by,
            )
        )


def _check_delta(
    session_factory: sessionmaker[Session],
    store: BlobStore,
    ckpt_id: str,
    name: str,
    key: str,
    tmp: Path,
    report: ScrubReport,
) -> None:
    used_by = [f"checkpoint {ckpt_id} ({name}) delta"]
    local = store.local_path(key)
    try:
        if local is None:
            local = tmp / "delta.slim"
            store.get_to_file(key, local)
        with DeltaReader(local) as reader:
            for frame in reader.doc.frames:
                reader.frame(frame)
                report.frames_checked += 1
            entries = {f.path: f for f in reader.doc.files}
    except StorageError as exc:  # before SlimError, the core's base that it derives from
        report.problems.append(ScrubProblem("corrupt", key, str(exc), used_by))
        return
    except SlimError as exc:
        kind = "corrupt_frame" if exc.code == "integrity_error" else "invalid_delta"
        report.problems.append(ScrubProblem(kind, key, f"[{exc.code}] {exc.detail}", used_by))
        return
    finally:
        if local is not None and local.parent == tmp:
            local.unlink(missing_ok=True)
    report.deltas_checked += 1
    with session_factory() as session:
        for row in session.scalars(select(File).where(File.checkpoint_id == ckpt_id)):
            entry = entries.get(row.path)
            want = entry and (entry.recon_sha256 or entry.sha256)
            if entry is None or (row.recon_sha256 is not None and row.recon_sha256 != want):
                report.problems.append(
                    ScrubProblem(
                        "mismatch",
                        key,
                        f"file {row.path!r}: the row records recon sha256 {row.recon_sha256}, "
                        f"the delta {want}",
                        used_by,
                    )
                )
