"""Cheap checks of stored uploads: safetensors headers read by bounded range reads.

A commit validates every weight file again (the header of each, fetched with two small range
reads — never the tensor data) and, for a checkpoint, plans its tensors against the base with
:func:`core.taskvector.plan_tensors`, all before a job is queued. The header-only
:class:`~core.checkpoint.CheckpointDir` built here has no directory behind it: it serves
planning and counting, not tensor reads.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from core.checkpoint import INDEX_SUFFIX, CheckpointDir, TensorRef
from core.constants import FLOAT_DTYPES
from core.errors import BaseMismatch, InvalidCheckpoint, InvalidSafetensors
from core.safetensors_io import Header, parse_header
from core.taskvector import TensorPlan, match_prefix, plan_tensors
from service.errors import NoWeights
from storage.blobstore import BlobStore
from storage.models import File, FileRole

#: Largest sharding index read during validation.
MAX_INDEX_BYTES = 64 << 20
_NOWHERE = Path("/nonexistent/slimstore-stored-checkpoint")


def read_stored_header(store: BlobStore, key: str, size: int, *, max_header: int) -> Header:
    """Parse the header of a stored safetensors blob (reads 8 + N bytes, nothing more)."""
    first = b"".join(store.open_range(key, 0, 8))
    if len(first) == 8:
        n = int.from_bytes(first, "little")
        if n <= max_header:
            first += b"".join(store.open_range(key, 8, min(8 + n, size)))
    return parse_header(first, file_size=size, max_header=max_header)


def stored_checkpoint(
    store: BlobStore, rows: list[File], *, max_header: int, what: str
) -> CheckpointDir:
    """A header-only checkpoint over stored file rows.

    Raises:
        NoWeights: no ``*.safetensors`` file.
        InvalidSafetensors: a weight file's header is invalid (the message names the file).
        InvalidCheckpoint: a tensor appears in two files, or a sharding index disagrees.
    """
    headers: dict[str, Header] = {}
    tensors: dict[str, TensorRef] = {}
    aux: list[str] = []
    for row in sorted(rows, key=lambda r: r.path):
        if row.role != FileRole.WEIGHTS:
            aux.append(row.path)
            continue
        if row.blob_key is None:
            raise InvalidCheckpoint(f"{row.path}: the uploaded bytes are no longer stored")
        try:
            header = read_stored_header(store, row.blob_key, row.size, max_header=max_header)
        except InvalidSafetensors as exc:
            raise type(exc)(f"{row.path}: {exc.detail}") from None
        headers[row.path] = header
        for name, info in header.tensors.items():
            if name in tensors:
                raise InvalidCheckpoint(
                    f"tensor {name!r} appears in both {tensors[name].file} and {row.path}; "
                    "each tensor must live in one file"
                )
            tensors[name] = TensorRef(row.path, info)
    if not headers:
        raise NoWeights(
            f"the {what} has no *.safetensors file; upload the weights saved with "
            "save_pretrained(..., safe_serialization=True) (pickled .bin files are not read)"
        )
    ckpt = CheckpointDir(_NOWHERE, headers, aux, tensors)
    _check_indexes(store, rows, ckpt)
    return ckpt


def _check_indexes(store: BlobStore, rows: list[File], ckpt: CheckpointDir) -> None:
    for row in rows:
        if not row.path.endswith(INDEX_SUFFIX) or row.blob_key is None:
            continue
        if row.size > MAX_INDEX_BYTES:
            raise InvalidCheckpoint(f"{row.path} is over {MAX_INDEX_BYTES} bytes")
        try:
            doc = json.loads(b"".join(store.open_range(row.blob_key)))
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            raise InvalidCheckpoint(f"{row.path} is not a valid sharding index") from None
        prefix = str(PurePosixPath(row.path).parent)
        for name, file in weight_map.items():
            want = file if prefix == "." else f"{prefix}/{file}"
            ref = ckpt.tensors.get(name)
            if ref is None or ref.file != want:
                raise InvalidCheckpoint(
                    f"{row.path} maps {name!r} to {file}, but that file does not hold it; "
                    "upload the matching shards"
                )


def check_fits_base(ft: CheckpointDir, base: CheckpointDir) -> list[TensorPlan]:
    """Plan the fine-tune against the base; 400 ``base_mismatch`` when it does not fit.

    Beyond :func:`plan_tensors` (most parameters must have a same-named, same-shaped base
    tensor), a tensor whose base twin has the same shape but is floating point on one side
    only is refused: that is a different model, not a fine-tune. New or resized tensors (heads,
    grown embeddings) are fine; they are stored dense.
    """
    plans = plan_tensors(ft, base)
    fp, bp = match_prefix(ft, base)
    for plan in plans:
        if plan.reason != "not floating point" or not plan.name.startswith(fp):
            continue
        twin = base.tensors.get(bp + plan.name[len(fp) :])
        if twin is not None and (plan.dtype in FLOAT_DTYPES) != (twin.info.dtype in FLOAT_DTYPES):
            raise BaseMismatch(
                f"tensor {plan.name!r} is {plan.dtype} but the base's is {twin.info.dtype}; "
                "the fine-tune does not come from this base"
            )
    return plans
