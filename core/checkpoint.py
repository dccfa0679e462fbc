"""A checkpoint directory: safetensors weight files (possibly sharded) plus other files.

Weight files are every ``*.safetensors`` file; all other regular files (config, tokenizer,
an index JSON, even a pickle someone left there) are "aux" files, carried byte for byte and
never parsed beyond what the index needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from core.errors import InvalidCheckpoint, InvalidSafetensors
from core.files import check_path
from core.safetensors_io import Header, SafetensorsFile, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    file: str  # relative posix path of the weight file
    info: TensorInfo


class CheckpointDir:
    """A validated checkpoint directory with lazy tensor access.

    Example:
        >>> ckpt = CheckpointDir.open("path/to/model")  # doctest: +SKIP
        >>> ckpt.tensors["embeddings.word_embeddings.weight"].info.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path,
        headers: dict[str, Header],
        aux_files: list[str],
        tensors: dict[str, TensorRef],
    ) -> None:
        self.root = root
        self.headers = headers  # weight file -> header, sorted by file name
        self.aux_files = aux_files
        self.tensors = tensors  # tensor name -> where it lives, in file then offset order
        self._open: dict[str, SafetensorsFile] = {}

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> CheckpointDir:
        """Scan a directory and validate every safetensors header (reads headers only).

        Raises:
            InvalidCheckpoint: not a directory, no safetensors files, a duplicate tensor, or a
                sharding index that disagrees with the files.
            InvalidSafetensors: a weight file's header is invalid (the message names the file).
        """
        root = Path(root)
        if not root.is_dir():
            raise InvalidCheckpoint(f"{root} is not a directory; pass a model directory")
        weight_files: list[str] = []
        aux_files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                full = Path(dirpath) / fn
                if not full.is_file():
                    continue
                rel = check_path(full.relative_to(root).as_posix())
                (weight_files if fn.endswith(".safetensors") else aux_files).append(rel)
        if not weight_files:
            raise InvalidCheckpoint(
                f"{root} holds no .safetensors files; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        headers: dict[str, Header] = {}
        tensors: dict[str, TensorRef] = {}
        for rel in sorted(weight_files):
            try:
                header = read_header(root / rel)
            except InvalidSafetensors as exc:
                raise InvalidSafetensors(f"{rel}: {exc.detail}") from None
            headers[rel] = header
            for name, info in header.tensors.items():
                if name in tensors:
                    raise InvalidCheckpoint(
                        f"tensor {name!r} appears in both {tensors[name].file} and {rel}"
                    )
                tensors[name] = TensorRef(rel, info)
        ckpt = cls(root, headers, aux_files, tensors)
        ckpt._check_index()
        return ckpt

    def _check_index(self) -> None:
        for rel in self.aux_files:
            if not rel.endswith(INDEX_SUFFIX):
                continue
            try:
                doc = json.loads((self.root / rel).read_text("utf-8"))
                weight_map = doc["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                weight_map = None
            if not isinstance(weight_map, dict):
                raise InvalidCheckpoint(
                    f"{rel} is not a valid sharding index; it must be a JSON object whose "
                    '"weight_map" maps tensor names to file names'
                )
            prefix = str(PurePosixPath(rel).parent)
            for name, file in weight_map.items():
                want = file if prefix == "." else f"{prefix}/{file}"
                ref = self.tensors.get(name)
                if ref is None or ref.file != want:
                    raise InvalidCheckpoint(
                        f"{rel} maps {name!r} to {file}, but that file does not hold it"
                    )

    @property
    def num_params(self) -> int:
        return sum(ref.info.numel for ref in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(h.file_size for h in self.headers.values())

    def file_size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size

    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype (reads only that tensor)."""
        return self._file(name).get(name)

    def _file(self, name: str) -> SafetensorsFile:
        ref = self.tensors[name]
        f = self._open.get(ref.file)
        if f is None:
            f = self._open[ref.file] = SafetensorsFile(self.root / ref.file)
        return f

    def read_bytes(self, name: str, start: int = 0, size: int | None = None) -> memoryview:
        """Raw bytes of one tensor, or ``size`` of them from byte ``start`` (a fresh,
        writable buffer)."""
        return self._file(name).read_bytes(name, start, size)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> CheckpointDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
