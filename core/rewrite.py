"""A stored delta with other small files: the same weights, another set of aux files.

A commit that changes only a model's small files (a README, a tokenizer) keeps the weights of
its parent revision. Rather than compressing those weights again, :func:`with_aux_files` copies
the parent delta's weight frames and document as they are and stores the new set of aux files:
the result rebuilds the same weights bit for bit (same frames, same ``recon_sha256``) and the
new aux files exactly. No tensor is decoded; the cost is copying the frames.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from core.constants import ZSTD_LEVEL
from core.delta_format import DeltaReader, DeltaWriter, FileEntry
from core.errors import InvalidArgument
from core.files import check_path, sha256_file
from core.frames import zstd_compress


def with_aux_files(
    delta: str | os.PathLike[str],
    out: str | os.PathLike[str],
    aux: Mapping[str, str | os.PathLike[str]],
    *,
    level: int = ZSTD_LEVEL,
) -> int:
    """Write to ``out`` the delta ``delta`` with its aux files replaced by ``aux`` (path in the
    model directory → a local file holding its bytes); returns the size written.

    An aux file identical (path and sha256) to one of the old delta keeps its entry (its frame,
    or its reference to a base file); others get a frame of their own.

    Raises:
        InvalidArgument: an aux path is also a weights file of the delta.
        InvalidPath: an aux path that is not a plain relative path.
    """
    with DeltaReader(delta) as reader:
        doc = reader.doc
        weights = [f for f in doc.files if f.role == "weights"]
        old_aux = {(f.path, f.sha256): f for f in doc.files if f.role != "weights"}
        clash = sorted({f.path for f in weights} & set(aux))
        if clash:
            raise InvalidArgument(f"{clash[0]} is a weights file of the delta, not an aux file")
        writer = DeltaWriter(out)
        try:
            kept = {name for f in weights for name in [f.header_frame] if name is not None}
            kept |= {t.frame for t in doc.tensors if t.frame is not None}
            for name in doc.frames:  # in the old order; weights' frames only
                if name in kept:
                    writer.add(name, reader.frame(name))
            files: list[FileEntry] = list(weights)
            for i, (rel, local) in enumerate(sorted(aux.items())):
                check_path(rel)
                digest = sha256_file(local)
                previous = old_aux.get((rel, digest))
                if previous is not None and previous.frame is None:
                    files.append(previous)  # identical to a base file
                    continue
                name = f"x{i}"
                while name in writer.frames or name in kept:
                    name += "_"
                data = Path(local).read_bytes()
                if previous is not None and previous.frame is not None:
                    writer.add(name, reader.frame(previous.frame))
                else:
                    writer.add(name, zstd_compress(data, level))
                files.append(
                    FileEntry(path=rel, role="aux", size=len(data), sha256=digest, frame=name)
                )
            new_doc = replace(doc, files=files, frames={})
            return writer.finish(new_doc)
        except BaseException:
            writer.abort()
            raise
