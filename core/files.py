"""Rules about the files of a checkpoint, written once: path names, hashing, the manifest digest
and the formats Slimstore never reads.

Torch-free on purpose (only the standard library and :mod:`core.errors`): the storage layer,
the service's upload path and light tools import it without loading a tensor library.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from core.errors import InvalidPath

#: Bytes per read and write of every streamed transfer and hash (1 MiB).
CHUNK_SIZE = 1 << 20

#: The HTTP header naming a rebuilt file's xxh3-128 (hex) beside its sha256 ETag: the digest
#: recorded when the delta was written, which the SDK checks a pulled body against (the server
#: checks the same digest as it streams; sha256 costs ~16× the CPU per byte).
HEADER_XXH3 = "X-Slim-Xxh3"
#: Bytes per write system call of a large write (:func:`write_all`). Measured on a 2-core
#: host, kernel 6.18 (a 1 GB download, server on the same host, four rounds taking turns with
#: curl -o file): 1 MiB writes spent 1.6–1.8 s of kernel time per GB in three rounds of four
#: (the SDK's pull 0.4–0.45× curl's); 64 KiB writes 0.4–0.6 s (0.97–1.11× curl); 256 KiB in
#: between and noisier. curl itself writes 16 KiB at a time. The server's blob writes keep
#: their 4 MiB chunks: one upload took the same 721–756 MiB/s either way, and ten at once
#: cost the API more CPU per byte in 64 KiB writes (3.41 s/GiB against 2.8–3.07).
WRITE_SIZE = 64 << 10


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to the file descriptor ``fd``, :data:`WRITE_SIZE` at a time."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_SIZE):
        chunk = view[start : start + WRITE_SIZE]
        while chunk:
            chunk = chunk[os.write(fd, chunk) :]


#: Longest file path accepted, in UTF-8 bytes (the database column holds 1024 characters).
MAX_PATH_BYTES = 1024
#: File name endings of formats Slimstore never reads: pickled weights (torch ``.bin``, ``.pt``,
#: ``.pth``, Lightning ``.ckpt``) and other pickles. Storing them would keep bytes no pull should
#: hand back (a pickle runs code when loaded), so the service refuses them and a push skips them.
UNREAD_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill")

_PATH_HINT = (
    "use a relative path such as 'model.safetensors' or 'tokenizer/vocab.json' (no '.' or '..' "
    "parts, no leading '/', no empty part, no NUL, backslash or control characters)"
)


def check_path(path: str) -> str:
    """Return ``path`` if it names a file inside a checkpoint, unchanged.

    The one rule for file paths (uploads, stored rows, delta documents, files written on
    reconstruction): a non-empty relative POSIX path whose parts are neither empty, ``.`` nor
    ``..``; no backslash; printable characters only; at most :data:`MAX_PATH_BYTES` bytes of
    UTF-8. Paths are never normalised: one file has one spelling.

    Raises:
        InvalidPath: the path breaks the rule; the message names the reason and the fix.

    Example:
        >>> check_path("tokenizer/vocab.json")
        'tokenizer/vocab.json'
    """
    if not path or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise InvalidPath(f"invalid file path {path!r}; {_PATH_HINT}")
    if not path.isprintable():  # NUL, newlines and other control characters
        raise InvalidPath(f"invalid file path {path!r}: it holds control characters; {_PATH_HINT}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidPath(
            f"file path of {len(path)} characters is over {MAX_PATH_BYTES} bytes; "
            "use a shorter name"
        )
    return path


def is_unread(path: str) -> bool:
    """Whether ``path`` names a format Slimstore never reads (:data:`UNREAD_SUFFIXES`)."""
    return path.lower().endswith(UNREAD_SUFFIXES)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read :data:`CHUNK_SIZE` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(entries: Iterable[tuple[str, str]]) -> str:
    """The identity of a file set: sha256 over its ``path\\0sha256\\n`` lines, sorted by path.

    Example:
        >>> manifest_sha256([("b.json", "00"), ("a.safetensors", "ff")])[:12]
        '47940048e052'
    """
    h = hashlib.sha256()
    for path, digest in sorted(entries):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()
