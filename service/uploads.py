"""Streamed file uploads: request body → blob store, with the safetensors header checked on the fly.

The body is read ahead from ``Request.stream()`` on the event loop, merged into ~4 MiB chunks
(:func:`service.streaming.body_in_thread`) and handed to ``BlobStore.put_stream`` in a worker
thread (running sha256, size cap, temp name + atomic rename); it is never buffered whole nor
spooled twice. For ``*.safetensors`` files the first
``8 + N`` bytes are parsed as they pass (:class:`HeaderCheck`): a bad header, a body that ends
early or carries trailing bytes raises *inside* the stream, so the store discards the partial
blob and no row is written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

import anyio
import anyio.to_thread

from core.errors import HeaderTooLarge, InvalidSafetensors
from core.files import is_unread
from core.safetensors_io import Header, parse_header
from service.errors import ApiError, ChecksumMismatch, TooManyTensors, Truncated
from service.streaming import body_in_thread
from storage.blobstore import BlobInfo, BlobStore
from storage.errors import BlobTooLarge
from storage.errors import IntegrityError as StorageIntegrityError
from storage.models import FileRole

#: A declared header length at or above this is not a safetensors file at all.
IMPLAUSIBLE_HEADER = 1 << 32
#: First bytes of a pickle of protocol 2 to 5 (PROTO opcode, then the protocol number).
PICKLE_MAGIC = tuple(bytes([0x80, n]) for n in range(2, 6))


class UnsupportedFile(ApiError):
    """415 ``unsupported_file``: a file the service does not read (pickled weights)."""

    code = "unsupported_file"


def check_readable(path: str) -> None:
    """Refuse a file the service does not read, by its name (415 ``unsupported_file``)."""
    if is_unread(path):
        raise UnsupportedFile(
            f"{path}: Slimstore does not store {path.rsplit('.', 1)[-1]} files (pickled "
            "weights are never read and a pickle runs code when loaded); save the weights with "
            "save_pretrained(..., safe_serialization=True) and leave this file out — `slim push` "
            "skips such files"
        )


class PickleCheck:
    """Pass chunks through, refusing a body that opens like a pickle whatever its name."""

    def __init__(self, chunks: Iterable[bytes], path: str) -> None:
        self._chunks = chunks
        self._path = path

    def __iter__(self) -> Iterator[bytes]:
        head = b""
        for chunk in self._chunks:
            if len(head) < 2:
                head += chunk[:2]
                if len(head) >= 2 and head[:2] in PICKLE_MAGIC:
                    raise UnsupportedFile(
                        f"{self._path} is a Python pickle; Slimstore never stores pickles "
                        "(they run code when loaded) — leave it out of the upload"
                    )
            yield chunk


def role_of(path: str) -> FileRole:
    return FileRole.WEIGHTS if path.endswith(".safetensors") else FileRole.AUX


class HeaderCheck:
    """Pass chunks through while validating a safetensors header from the first bytes.

    Raises from inside the iteration (so the blob store aborts the upload):
        Truncated: the body ends inside the header or before the data the header declares.
        HeaderTooLarge: the header is longer than ``max_header``.
        InvalidSafetensors: anything else, including trailing bytes after the data.
    """

    def __init__(
        self,
        chunks: Iterable[bytes],
        *,
        max_header: int,
        declared_size: int | None,
        max_tensors: int | None = None,
    ) -> None:
        self._chunks = chunks
        self._max_header = max_header
        self._declared = declared_size
        self._max_tensors = max_tensors
        self.header: Header | None = None

    def __iter__(self) -> Iterator[bytes]:
        head = bytearray()
        need: int | None = None
        opened = False
        total = 0
        for chunk in self._chunks:
            total += len(chunk)
            if self.header is None:
                head += chunk
                if need is None and len(head) >= 8:
                    if len(head) > 8:  # a zip or a pickle is "not safetensors", whatever
                        opened = _check_opening(head, None)  # its first 8 bytes declare
                    need = 8 + self._header_len(bytes(head[:8]))
                if not opened:
                    opened = _check_opening(head, need)
                if need is not None and len(head) >= need:
                    self.header = parse_header(bytes(head[:need]), max_header=self._max_header)
                    head = bytearray()
                    check_tensor_count(self.header, self._max_tensors)
                    self._check_declared(self.header)
            if self.header is not None and total > self.header.file_size:
                raise InvalidSafetensors(
                    f"the body goes on past the {self.header.file_size} bytes its header "
                    "declares; the file has trailing bytes or is not one safetensors file"
                )
            yield chunk
        if self.header is None:
            raise Truncated(
                f"the body ended after {total} bytes, inside the safetensors header; "
                "the upload was cut short or the file is not safetensors — send it again"
            )
        if total < self.header.file_size:
            raise Truncated(
                f"the body ended after {total} of the {self.header.file_size} bytes its "
                "header declares; the upload was cut short — send the file again"
            )

    def _header_len(self, first8: bytes) -> int:
        n = int.from_bytes(first8, "little")
        if n >= IMPLAUSIBLE_HEADER:
            raise InvalidSafetensors(
                f"the first 8 bytes declare a {n}-byte header; this is not a safetensors "
                "file (save weights with save_pretrained(..., safe_serialization=True))"
            )
        if n > self._max_header:
            raise HeaderTooLarge(
                f"the safetensors header is {n} bytes, over this server's limit of "
                f"{self._max_header}; split the file into shards or ask for a higher "
                "SLIM_MAX_HEADER_BYTES"
            )
        return n

    def _check_declared(self, header: Header) -> None:
        if self._declared is not None and self._declared < header.file_size:
            raise Truncated(
                f"Content-Length is {self._declared} bytes but the header declares a "
                f"{header.file_size}-byte file; the file is truncated — send all of it"
            )


def check_tensor_count(header: Header, max_tensors: int | None, path: str | None = None) -> None:
    """400 ``too_many_tensors`` when a header lists more tensors than the server accepts."""
    if max_tensors is not None and len(header.tensors) > max_tensors:
        where = f"{path}: " if path else ""
        raise TooManyTensors(
            f"{where}the header lists {len(header.tensors)} tensors, over this server's limit "
            f"of {max_tensors}; split the file into shards or ask for a higher "
            "SLIM_MAX_TENSORS_PER_FILE"
        )


def _check_opening(head: bytearray, need: int | None) -> bool:
    """Whether the JSON header visibly opens with ``{`` (False: not enough bytes yet).

    Catches other formats (zip, pickle, text) at their first bytes, whatever length their
    first 8 bytes happen to declare."""
    if len(head) <= 8:
        return False
    rest = bytes(head[8 : need or len(head)]).lstrip(b" \t\r\n")
    if not rest:
        return False
    if rest[:1] != b"{":
        raise InvalidSafetensors(
            "the header is not a JSON object; this is not a safetensors file (save weights "
            "with save_pretrained(..., safe_serialization=True))"
        )
    return True


def store_body(
    body: Iterable[bytes],
    store: BlobStore,
    *,
    path: str,
    max_bytes: int,
    max_header: int,
    declared_size: int | None,
    expected_sha256: str | None,
    max_tensors: int | None = None,
) -> BlobInfo:
    """Stream a request body into the blob store (call in a worker thread)."""
    chunks: Iterable[bytes] = body
    if role_of(path) == FileRole.WEIGHTS:
        chunks = HeaderCheck(
            chunks, max_header=max_header, declared_size=declared_size, max_tensors=max_tensors
        )
    else:
        chunks = PickleCheck(chunks, path)
    try:
        return store.put_stream(chunks, max_bytes=max_bytes, expected_sha256=expected_sha256)
    except StorageIntegrityError as exc:
        raise ChecksumMismatch(exc.detail) from None


async def receive_file(
    stream: AsyncIterator[bytes],
    store: BlobStore,
    *,
    path: str,
    max_bytes: int,
    max_header: int,
    declared_size: int | None,
    expected_sha256: str | None,
    max_tensors: int | None = None,
) -> BlobInfo:
    """Store an upload from the event loop without blocking it (a file the service does not
    read is refused before its body is read)."""
    check_readable(path)
    if declared_size is not None and declared_size > max_bytes:
        raise BlobTooLarge(max_bytes)
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.strip().lower()
    async with body_in_thread(stream) as body:
        return await anyio.to_thread.run_sync(
            lambda: store_body(
                body,
                store,
                path=path,
                max_bytes=max_bytes,
                max_header=max_header,
                declared_size=declared_size,
                expected_sha256=expected_sha256,
                max_tensors=max_tensors,
            )
        )
