"""Reconstruction: base + decoded delta (× λ), streamed tensor by tensor.

Each weight file is rebuilt with its original header bytes, so names, dtypes, shapes, offsets
and shard layout are the fine-tune's own. Reconstruction is deterministic (elementwise float32
arithmetic, one rounding to the stored dtype), so the sha256 of every file at scale 1 is
recorded when the delta is written and checked on every later reconstruction.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash

from core import codec
from core.checkpoint import CheckpointDir, check_relpath
from core.constants import CHUNK_SIZE, DTYPES, MAX_HEADER_BYTES
from core.delta_format import DeltaReader, FileEntry, FrameSource, TensorEntry
from core.errors import BaseMismatch, IntegrityError, InvalidDelta, InvalidSafetensors
from core.safetensors_io import Header, bytes_to_tensor, parse_header, tensor_view
from core.tensor_codec import decode_sparse


def _base_tensor(base: CheckpointDir, entry: TensorEntry) -> torch.Tensor:
    if entry.base_name is None or entry.base_name not in base.tensors:
        raise BaseMismatch(
            f"the base has no tensor {entry.base_name!r} that the delta needs; "
            "reconstruct against the base the delta was made from"
        )
    ref = base.tensors[entry.base_name]
    if list(ref.info.shape) != list(entry.shape):
        raise BaseMismatch(
            f"base tensor {entry.base_name!r} has another shape than the delta expects"
        )
    return base.get(entry.base_name).reshape(-1)


class RebuildHasher:
    """Both digests recorded for a rebuilt weight file: sha256 (the ETag, what clients check
    end to end) and xxh3-128 (what the server checks as it streams: ~9 GB/s on one core
    against sha256's ~1.1, so the check does not cap a download)."""

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._sha = hashlib.sha256(data)
        self._xxh = xxhash.xxh3_128(data)

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._xxh.update(data)

    def record(self, entry: FileEntry) -> str:
        """Write both digests into ``entry``; returns the sha256."""
        entry.recon_sha256 = self._sha.hexdigest()
        entry.recon_xxh3 = self._xxh.hexdigest()
        return entry.recon_sha256


class StreamCheck:
    """A digest (``sha256`` or ``xxh3``, i.e. xxh3-128) that bytes passing by must match."""

    def __init__(self, kind: str, want: str) -> None:
        self.kind, self.want = kind, want
        self._h: Any = xxhash.xxh3_128() if kind == "xxh3" else hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    @property
    def got(self) -> str:
        return str(self._h.hexdigest())

    def ok(self) -> bool:
        return self.got == self.want


def rebuild_check(file: FileEntry, scale: float) -> StreamCheck | None:
    """The check a rebuilt file's bytes must pass: xxh3-128 where the delta records it,
    sha256 for files of version-1 deltas and for aux files; None where nothing is recorded
    (scale ≠ 1)."""
    if scale == 1.0 and file.recon_xxh3:
        return StreamCheck("xxh3", file.recon_xxh3)
    want = expected_sha256(file, scale)
    return None if want is None else StreamCheck("sha256", want)


def tensor_bytes(
    entry: TensorEntry, reader: FrameSource, base: CheckpointDir, scale: float = 1.0
) -> bytes | memoryview:
    """The bytes of one reconstructed tensor in the fine-tune's dtype (a view, not a copy,
    where the tensor was built in memory)."""
    if entry.dtype not in DTYPES:
        raise InvalidDelta(f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
    itemsize, dtype = DTYPES[entry.dtype]
    nbytes = entry.numel * itemsize
    if entry.kind == "dense":
        if entry.frame is None:
            raise InvalidDelta(f"dense tensor {entry.name!r} has no frame")
        return codec.zstd_decompress(reader.frame(entry.frame), nbytes)
    base_t = _base_tensor(base, entry)  # (numel,) in the base's dtype
    if entry.kind == "same":
        return tensor_view(base_t.to(dtype))
    if entry.kind == "lossless":
        if entry.frame is None or base_t.dtype != dtype:
            raise InvalidDelta(f"lossless tensor {entry.name!r} is malformed")
        if scale == 1.0:  # base_t is a fresh buffer of ours: the planes are XORed into it
            return codec.decode_xor(
                reader.frame(entry.frame), tensor_view(base_t), itemsize, in_place=True
            )
        exact = codec.decode_xor(reader.frame(entry.frame), tensor_view(base_t), itemsize)
        ft = bytes_to_tensor(exact, entry.dtype, (entry.numel,)).to(torch.float32)
        b = base_t.to(torch.float32)
        return tensor_view((b + scale * (ft - b)).to(dtype))
    if entry.kind != "sparse":
        raise InvalidDelta(f"tensor {entry.name!r} has unknown kind {entry.kind!r}")
    positions, values = decode_sparse(entry, reader)
    idx = torch.from_numpy(positions)
    if base_t.dtype == dtype:
        out = base_t.clone() if not base_t.is_contiguous() else base_t
        out[idx] = (base_t[idx].to(torch.float32) + scale * values).to(dtype)
    else:
        full = base_t.to(torch.float32)
        full[idx] += scale * values
        out = full.to(dtype)
    return tensor_view(out)


def iter_file(
    reader: DeltaReader, base: CheckpointDir, file: FileEntry, scale: float = 1.0
) -> Iterator[bytes | memoryview]:
    """Stream one reconstructed file: header bytes, then each tensor's bytes in file order."""
    if file.role == "aux":
        if file.base_path is not None:
            path = base.root / check_relpath(file.base_path)
            if not path.is_file():
                raise BaseMismatch(
                    f"the base lacks {file.base_path}, which the delta shares with it"
                )
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    yield chunk
            return
        if file.frame is None:
            raise InvalidDelta(f"file {file.path!r} has no frame")
        yield codec.zstd_decompress(reader.frame(file.frame), file.size)
        return
    raw_header, header = weight_header(reader, file)
    yield raw_header
    entries = reader.doc.tensor_map()
    todo = []
    for name in header.tensors:
        entry = entries.get(name)
        if entry is None:
            raise InvalidDelta(
                f"weight file {file.path!r} names a tensor the delta lacks: {name!r}"
            )
        todo.append(entry)
    yield from rebuilt_ahead(todo, reader, base, scale)


def rebuilt_ahead(
    entries: list[TensorEntry], reader: FrameSource, base: CheckpointDir, scale: float = 1.0
) -> Iterator[bytes | memoryview]:
    """:func:`tensor_bytes` of each entry in order, the next one rebuilt in a helper thread
    while the caller hashes, writes or sends the current one (torch, zstd, file reads and
    sha256 release the GIL). At most two rebuilt tensors are alive at once; the reader and
    the base are only ever used by one thread at a time."""
    if not entries:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slim-rebuild") as pool:
        ahead = pool.submit(tensor_bytes, entries[0], reader, base, scale)
        for i in range(len(entries)):
            data = ahead.result()
            if i + 1 < len(entries):
                ahead = pool.submit(tensor_bytes, entries[i + 1], reader, base, scale)
            yield data
            del data


def weight_header(reader: FrameSource, file: FileEntry) -> tuple[bytes, Header]:
    """The original header bytes of a weight file, and the header parsed from them."""
    size = file.header_size
    if file.header_frame is None or size is None or not 8 < size <= 8 + MAX_HEADER_BYTES:
        raise InvalidDelta(f"weight file {file.path!r} has no valid header frame")
    raw = codec.zstd_decompress(reader.frame(file.header_frame), size)
    try:
        header = parse_header(raw, file_size=file.size)
    except InvalidSafetensors as exc:
        raise InvalidDelta(
            f"weight file {file.path!r}: stored header is invalid ({exc.detail})"
        ) from None
    return raw, header


def file_sha256(
    reader: DeltaReader, base: CheckpointDir, file: FileEntry, scale: float = 1.0
) -> str:
    """sha256 of a reconstructed file, computed from the stream (nothing written)."""
    h = hashlib.sha256()
    for chunk in iter_file(reader, base, file, scale):
        h.update(chunk)
    return h.hexdigest()


def expected_sha256(file: FileEntry, scale: float) -> str | None:
    """The hash a reconstruction must have: recorded at write time, for scale 1 only."""
    if scale != 1.0:
        return None
    return file.sha256 if file.role == "aux" else file.recon_sha256


def reconstruct(
    base_dir: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scale: float = 1.0,
) -> list[Path]:
    """Rebuild the fine-tune's directory from a base and a delta.

    Each file is written to ``<name>.incomplete``, checked against its recorded digest (at
    scale 1: xxh3-128 where recorded, else sha256) and moved into place; a mismatch raises
    and leaves no file at the final name.

    Args:
        base_dir: directory of the base model the delta was made from.
        delta_path: the delta file.
        out_dir: where to write; created if missing.
        scale: λ of θ_pre + λ·δ (1.0 rebuilds the compressed fine-tune).

    Returns:
        Paths of the written files.

    Raises:
        BaseMismatch, InvalidDelta, UnsupportedFormatVersion, IntegrityError.
    """
    out = Path(out_dir)
    base = CheckpointDir.open(base_dir)
    written: list[Path] = []
    with DeltaReader(delta_path) as reader, base:
        check_base(reader, base)
        for file in reader.doc.files:
            target = out / check_relpath(file.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".incomplete")
            check = rebuild_check(file, scale)
            with open(tmp, "wb") as f:
                for chunk in iter_file(reader, base, file, scale):
                    if check is not None:
                        check.update(chunk)
                    f.write(chunk)
            if check is not None and not check.ok():
                tmp.unlink()
                raise IntegrityError(
                    f"reconstructed {file.path} does not match the file recorded when the delta "
                    f"was written (sha256 {file.recon_sha256 or file.sha256}, checked by its "
                    f"{check.kind}); the base or the delta is not the one it was made with"
                )
            os.replace(tmp, target)
            written.append(target)
    return written


def check_base(reader: DeltaReader, base: CheckpointDir) -> None:
    """Cheap check that ``base`` is the delta's base: its weight files' names and sizes."""
    recorded = {f["path"]: f["size"] for f in reader.doc.base.get("files", [])}
    actual = {rel: h.file_size for rel, h in base.headers.items()}
    if recorded and recorded != actual:
        raise BaseMismatch(
            "the base directory's weight files differ from the base this delta was made from "
            f"(delta expects {sorted(recorded)}); pass the right base"
        )


def load_state(
    base_dir: str | os.PathLike[str], delta_path: str | os.PathLike[str], *, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """All reconstructed tensors in memory (for tests and small models)."""
    base = CheckpointDir.open(base_dir)
    out: dict[str, torch.Tensor] = {}
    with DeltaReader(delta_path) as reader, base:
        for entry in reader.doc.tensors:
            raw = tensor_bytes(entry, reader, base, scale)
            out[entry.name] = bytes_to_tensor(raw, entry.dtype, tuple(entry.shape)).clone()
    return out
