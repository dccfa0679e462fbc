"""The delta container: a safetensors file of U8 byte frames plus a JSON document.

Any safetensors reader can list a delta and read one frame; S3 ranged GETs can fetch one
tensor's frames. The document says how to rebuild every file of the fine-tune from the base:
plain JSON in ``__metadata__["slimstore"]`` up to version 5, zstd-compressed and base64-coded
in ``__metadata__["slimstore.zst"]`` from version 6 (``"slimstore"`` then holds a stub naming
it). ``docs/format.md`` is the full specification.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import xxhash

from core.constants import (
    DOCUMENT_ZSTD_LEVEL,
    FORMAT_NAME,
    FORMAT_VERSION,
    HYBRID_VERSION,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    PACKED_KEY,
    PACKED_VERSION,
    READABLE_VERSIONS,
)
from core.errors import (
    IntegrityError,
    InvalidCheckpoint,
    InvalidDelta,
    InvalidSafetensors,
    UnsupportedFormatVersion,
)
from core.files import CHUNK_SIZE, check_path
from core.frames import zstd_compress, zstd_decompress
from core.safetensors_io import Header, build_header, parse_header, read_header

TENSOR_KINDS = ("sparse", "dense", "same", "lossless", "lowrank", "hybrid")


class FrameSource(Protocol):
    """Anything frames can be read from: a :class:`DeltaReader`, or a writer mid-encode."""

    def frame(self, name: str) -> bytes: ...


class Arriving(Protocol):
    """A delta file still being written from its start on (a download that a rebuild follows).

    Frames lie in the order the encoder wrote them, tensor by tensor in each weight file's
    order, so a reader waits only for the bytes of the frame it reads next.
    """

    @property
    def size(self) -> int:
        """The file's size once complete."""
        ...

    def wait(self, end: int) -> None:
        """Return once bytes ``[0, end)`` are in the file; for ``end`` = :attr:`size`, once
        the whole file is there and has passed its own check (the sha256 of a download).
        Raises what stopped the file from arriving."""
        ...


#: Frames of at least this many bytes also record their xxh3-128 (format version 3), which
#: readers check instead of the sha256; below it the sha256 costs next to nothing and the
#: extra digest would only make small deltas bigger.
XXH3_MIN_FRAME = 1 << 20


@dataclass
class FrameRef:
    size: int
    sha256: str
    xxh3: str | None = None  # version 3: xxh3-128 of the same bytes, what readers check

    def check(self, data: bytes) -> bool:
        """Whether ``data`` is this frame: by its xxh3-128 where recorded (≈ 9 GB/s on one
        core), else by its sha256 (≈ 1 GB/s; frames of versions 1–2)."""
        if len(data) != self.size:
            return False
        if self.xxh3 is not None:
            return bool(xxhash.xxh3_128(data).hexdigest() == self.xxh3)
        return hashlib.sha256(data).hexdigest() == self.sha256


@dataclass
class TensorEntry:
    """How to rebuild one tensor of the fine-tune."""

    name: str
    kind: str  # sparse | dense | same | lossless | lowrank | hybrid (version 5)
    dtype: str  # the fine-tune's dtype
    shape: list[int]
    base_name: str | None = None
    base_dtype: str | None = None
    nnz: int = 0  # kept entries (sparse)
    positions: dict[str, Any] | None = None  # sparse: how positions are coded (+ section size)
    values: dict[str, Any] | None = None  # sparse: how values are coded (+ section size)
    frame: str | None = None  # the tensor's one frame (sparse sections, dense or lossless data)
    planes: list[int] | None = None  # lossless (version 3): size of each plane's zstd frame
    base_cast: bool | None = None  # lossless (version 5): the base is cast to dtype first
    residual: str | None = None  # lossless (version 5): "ulp", or (absent) the planes are XOR
    rank: int | None = None  # lowrank (version 4), hybrid (5): r, the factors' width
    factors: dict[str, Any] | None = None  # lowrank, hybrid: how A and B are coded (+ sizes)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class FileEntry:
    """One file of the fine-tune's directory."""

    path: str
    role: str  # weights | aux
    size: int
    sha256: str
    recon_sha256: str | None = None  # weights: sha256 of the reconstructed file at scale 1
    recon_xxh3: str | None = None  # weights: xxh3-128 of the same bytes (the fast stream check)
    header_frame: str | None = None  # weights: the original header bytes, zstd
    header_size: int | None = None  # weights: length of those bytes (8 + N)
    frame: str | None = None  # aux stored in the delta
    base_path: str | None = None  # aux identical to this base file (not stored again)


@dataclass
class DeltaDoc:
    base: dict[str, Any]  # fingerprint, num_params, files
    method: dict[str, Any]  # name, params, result (w, thresholds, ...), paper
    evaluation: dict[str, Any]  # kind, fitness before/after, trace, search_seconds, ...
    stats: dict[str, Any]  # num_params, kept, original_bytes, ...
    files: list[FileEntry]
    tensors: list[TensorEntry]
    frames: dict[str, FrameRef] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Compact JSON: keys sorted, fields that are None left out (readers default them)."""
        return json.dumps(_drop_none(asdict(self)), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeltaDoc:
        raw = _versioned_json(text)
        version = raw["version"]
        if "document" in raw:
            raise InvalidDelta("a packed document's stub is not a document")
        try:
            doc = cls(
                base=dict(raw["base"]),
                method=dict(raw["method"]),
                evaluation=dict(raw["evaluation"]),
                stats=dict(raw["stats"]),
                files=[FileEntry(**f) for f in raw["files"]],
                tensors=[TensorEntry(**t) for t in raw["tensors"]],
                frames={k: FrameRef(**v) for k, v in raw["frames"].items()},
                version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidDelta(f"delta document is malformed ({exc})") from None
        if version < HYBRID_VERSION and any(t.kind == "hybrid" for t in doc.tensors):
            raise InvalidDelta(
                f"hybrid tensors need format version {HYBRID_VERSION} (got {version})"
            )
        for f in doc.files:
            try:
                check_path(f.path)
                if f.base_path is not None:
                    check_path(f.base_path)
            except InvalidCheckpoint:
                raise InvalidDelta(f"delta names an unsafe file path {f.path!r}") from None
        return doc

    def tensor_map(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def _versioned_json(text: str) -> dict[str, Any]:
    """A document or a stub, parsed: a JSON object of format ``slimstore-delta`` and a version
    this reader knows (else :class:`UnsupportedFormatVersion`, which says to upgrade)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidDelta(f"delta document is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidDelta("delta document is nested too deeply") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise InvalidDelta("not a Slimstore delta (no slimstore-delta document)")
    version = raw.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UnsupportedFormatVersion(
            f"delta format version {version!r} is not supported by this reader (it reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade Slimstore to read it"
        )
    return raw


def pack_document(text: str, version: int) -> dict[str, str]:
    """The container's ``__metadata__`` for a document's JSON ``text`` of ``version``: the
    plain JSON up to version 5; from version 6 a stub under ``slimstore`` (format, version and
    where the document is, so that an older reader still says which version it met) and the
    document zstd-compressed, base64-coded, under ``slimstore.zst``."""
    if version < PACKED_VERSION:
        return {METADATA_KEY: text}
    data = text.encode()
    packed = base64.b64encode(zstd_compress(data, DOCUMENT_ZSTD_LEVEL)).decode("ascii")
    stub = {
        "format": FORMAT_NAME,
        "version": version,
        "document": {"key": PACKED_KEY, "coding": "zstd+base64", "size": len(data)},
    }
    return {
        METADATA_KEY: json.dumps(stub, separators=(",", ":"), sort_keys=True),
        PACKED_KEY: packed,
    }


def unpack_document(meta: Mapping[str, str], name: str) -> tuple[str, int | None]:
    """The document's JSON text from a container's ``__metadata__`` (inverse of
    :func:`pack_document`) and the version its stub states (None for versions 1–5, whose
    text is the document itself); ``name`` is the file's, for the messages."""
    if METADATA_KEY not in meta:
        raise InvalidDelta(
            f"{name} is a safetensors file but not a Slimstore delta "
            "(no slimstore document); pass a file written by `slim compress`"
        )
    text = meta[METADATA_KEY]
    if PACKED_KEY not in meta:
        return text, None
    stub = _versioned_json(text)
    where = stub.get("document")
    if (
        stub["version"] < PACKED_VERSION
        or not isinstance(where, dict)
        or where.get("key") != PACKED_KEY
        or where.get("coding") != "zstd+base64"
        or type(where.get("size")) is not int
    ):
        raise InvalidDelta(f"{name}: the stub of its packed document is malformed")
    try:
        packed = base64.b64decode(meta[PACKED_KEY], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidDelta(f"{name}: the packed document is not base64") from None
    try:
        return zstd_decompress(packed, where["size"]).decode(), stub["version"]
    except UnicodeDecodeError:
        raise InvalidDelta(f"{name}: the packed document is not UTF-8") from None


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


class DeltaWriter:
    """Collects frames into a temporary file, then writes the container atomically.

    Example:
        >>> w = DeltaWriter("out.slim")  # doctest: +SKIP
        >>> w.add("t0.val", b"...")  # doctest: +SKIP
        >>> w.finish(doc)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data: BinaryIO = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115
        self._order: list[str] = []
        self.frames: dict[str, FrameRef] = {}
        self._recent: dict[str, bytes] = {}

    def add(self, name: str, data: bytes) -> str:
        if name in self.frames:
            raise ValueError(f"frame {name!r} added twice")
        self._recent[name] = data
        self._data.write(data)
        self._order.append(name)
        fast = xxhash.xxh3_128(data).hexdigest() if len(data) >= XXH3_MIN_FRAME else None
        self.frames[name] = FrameRef(len(data), hashlib.sha256(data).hexdigest(), fast)
        return name

    def forget_recent(self) -> None:
        """Drop the frames kept for :meth:`frame` (call before encoding the next tensor)."""
        self._recent.clear()

    def frame(self, name: str) -> bytes:
        """A frame added since the last :meth:`forget_recent`, so the writer can be decoded
        like a reader (the encoder checks what it wrote and hashes the reconstruction)."""
        return self._recent[name]

    @property
    def frame_bytes(self) -> int:
        return sum(f.size for f in self.frames.values())

    def finish(self, doc: DeltaDoc) -> int:
        """Write the container; returns its size in bytes."""
        doc.frames = self.frames
        entries = [(n, "U8", (self.frames[n].size,)) for n in self._order]
        header = build_header(entries, pack_document(doc.to_json(), doc.version))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(header)
            self._data.seek(0)
            shutil.copyfileobj(self._data, out, CHUNK_SIZE)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._data.close()
        return self.path.stat().st_size

    def abort(self) -> None:
        self._data.close()


class DeltaReader:
    """Opens a delta, validates its container and document, reads frames with hash checks.

    With ``arriving``, the file at ``path`` is still being written (it stays at that path
    while it is read): the header and each frame are read once their bytes are there.
    """

    def __init__(self, path: str | os.PathLike[str], *, arriving: Arriving | None = None) -> None:
        self.path = Path(path)
        self._arriving = arriving
        try:
            self.header = (
                read_header(self.path) if arriving is None else _arrived_header(self.path, arriving)
            )
        except InvalidSafetensors as exc:
            raise InvalidDelta(f"{self.path.name} is not a delta container: {exc.detail}") from None
        text, stated = unpack_document(self.header.metadata or {}, self.path.name)
        self.doc = DeltaDoc.from_json(text)
        if stated is not None and self.doc.version != stated:
            raise InvalidDelta(f"{self.path.name}: its stub and its document state other versions")
        for name, ref in self.doc.frames.items():
            info = self.header.tensors.get(name)
            if info is None or info.dtype != "U8" or info.nbytes != ref.size:
                raise InvalidDelta(f"frame {name!r} is missing or has the wrong size")
        self._f: BinaryIO | None = None

    @property
    def size(self) -> int:
        return self.header.file_size

    def frame(self, name: str) -> bytes:
        """The bytes of one frame, checked against the digest recorded at write time."""
        ref = self.doc.frames.get(name)
        if ref is None:
            raise InvalidDelta(f"delta has no frame {name!r}")
        info = self.header.tensors[name]
        if self._arriving is not None:
            self._arriving.wait(self.header.data_offset + info.end)
        if self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._f.seek(self.header.data_offset + info.start)
        data = self._f.read(info.nbytes)
        if len(data) != info.nbytes or not ref.check(data):
            raise IntegrityError(
                f"frame {name!r} of {self.path.name} does not match its recorded "
                f"{'xxh3' if ref.xxh3 else 'sha256'}; the delta is corrupted — restore it from "
                "a replica"
            )
        return data

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _arrived_header(path: Path, arriving: Arriving) -> Header:
    """The header of a delta being written, read once its bytes are there (one bounded read,
    as :func:`core.safetensors_io.read_header`, checked against the final size)."""
    arriving.wait(min(8, arriving.size))
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            if n <= MAX_HEADER_BYTES:
                arriving.wait(min(8 + n, arriving.size))
                head += f.read(n)
    return parse_header(head, file_size=arriving.size)


def _container_header(reader: DeltaReader, doc: DeltaDoc, min_size: int = 0) -> bytes:
    """The container header ``reader``'s frames would have under the document ``doc``, padded
    so that the container is at least ``min_size`` bytes."""
    if set(doc.frames) != set(reader.doc.frames):
        raise InvalidDelta("a rewritten document must list the same frames")
    entries = [(n, "U8", (info.nbytes,)) for n, info in reader.header.tensors.items()]
    data = reader.size - reader.header.data_offset
    return build_header(entries, pack_document(doc.to_json(), doc.version), min_size - data)


def rewritten_size(reader: DeltaReader, doc: DeltaDoc) -> int:
    """The size the delta read by ``reader`` would have with ``doc`` as its document (what
    :func:`rewrite_document` would write), computed without writing anything."""
    return len(_container_header(reader, doc)) + reader.size - reader.header.data_offset


def rewrite_document(path: str | os.PathLike[str], doc: DeltaDoc, min_size: int = 0) -> None:
    """Replace a delta's document, keeping its frames (the container is rewritten atomically).

    Only informative parts (method, evaluation, stats) may change: the frames must stay the
    ones the document lists. ``min_size``: pad the header with spaces so that the file is at
    least that long (a document that states the file's own size settles on one; sizes of one
    delta's containers differ by multiples of 8 bytes).
    """
    path = Path(path)
    reader = DeltaReader(path)
    try:
        header = _container_header(reader, doc, min_size)
        tmp = path.with_name(path.name + ".tmp")
        with open(path, "rb") as src, open(tmp, "wb") as out:
            out.write(header)
            src.seek(reader.header.data_offset)
            shutil.copyfileobj(src, out, CHUNK_SIZE)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        reader.close()
