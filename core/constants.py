"""Format constants, kept in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.params import VALUE_BITS

#: Version of the delta container document; readers refuse versions they do not know.
FORMAT_VERSION = 6
#: The first version with ``hybrid`` tensors (low-rank factors plus a sparse residual); a
#: reader refuses them in an older document.
HYBRID_VERSION = 5
#: Versions this reader reads (1: before ``recon_xxh3``, checked by sha256 instead; 1–2:
#: lossless planes in one zstd frame, rebuilt a whole tensor at a time; 1–3: no ``lowrank``
#: tensors; 1–4: no ``hybrid`` tensors, no lossless tensor XORs a base of another dtype
#: (``base_cast``) or stores ulp residuals; 1–5: the document is plain JSON).
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
#: ``__metadata__`` key of a delta container that holds the JSON document (versions 1–5),
#: or (version 6) a small JSON stub naming the packed document.
METADATA_KEY = "slimstore"
#: The first version whose document is stored zstd-compressed and base64-coded under
#: :data:`PACKED_KEY` (in versions 1–5 it was plain JSON, about half of a 0.05 bits/param
#: MiniLM delta).
PACKED_VERSION = 6
#: ``__metadata__`` key of the packed document (version 6).
PACKED_KEY = "slimstore.zst"
#: Magic value of the document's ``format`` field.
FORMAT_NAME = "slimstore-delta"

#: Bytes of a tensor rebuilt at a time when reconstructing (memory does not grow with the
#: size of the largest tensor).
PIECE_BYTES = 8 << 20
#: Largest safetensors header we parse (the reference implementation uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest number of tensors in one safetensors file.
MAX_TENSORS = 1_000_000
#: Default zstd level for frames.
ZSTD_LEVEL = 10
#: zstd level of the packed document (version 6): tens of kilobytes of JSON, a few ms.
DOCUMENT_ZSTD_LEVEL = 19
#: Frames larger than this are bulk data (whole tensors' XOR planes, dense tensors): they are
#: compressed at :data:`ZSTD_BULK_LEVEL` on every core. Measured on bf16 XOR planes of a
#: Llama-shaped fine-tune: level 1 gives ratio 3.08 at 187 MB/s, level 10 gives 2.88 at 7 MB/s
#: (noise-like planes gain nothing from deeper match search; the entropy stage does the work).
ZSTD_BULK_BYTES = 1 << 20
ZSTD_BULK_LEVEL = 1
#: Largest decompressed size a single frame may claim (guards against zstd bombs).
MAX_FRAME_BYTES = 64 * 1024 * 1024 * 1024

#: safetensors dtype name -> (itemsize in bytes, name of its torch dtype): the one table of
#: dtypes. It is torch-free, so that what only reads and writes bytes (a lossless rebuild, the
#: SDK's ``pull --local``) never imports torch; :data:`DTYPES` and :data:`TORCH_TO_ST`, built
#: from it, import torch when first used (see ``__getattr__``).
DTYPE_SPECS: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
#: safetensors dtype name -> itemsize in bytes (torch-free).
ITEMSIZES: dict[str, int] = {k: v[0] for k, v in DTYPE_SPECS.items()}
if TYPE_CHECKING:
    import torch

    #: safetensors dtype name -> (itemsize in bytes, torch dtype)
    DTYPES: dict[str, tuple[int, torch.dtype]]
    TORCH_TO_ST: dict[torch.dtype, str]


def __getattr__(name: str) -> Any:
    """:data:`DTYPES` and :data:`TORCH_TO_ST`, built from :data:`DTYPE_SPECS` on first use
    (importing torch then, not when this module is imported)."""
    if name not in ("DTYPES", "TORCH_TO_ST"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    dtypes = {k: (size, getattr(torch, t)) for k, (size, t) in DTYPE_SPECS.items()}
    globals().update(DTYPES=dtypes, TORCH_TO_ST={v[1]: k for k, v in dtypes.items()})
    return globals()[name]


#: dtypes whose task vectors are computed (the rest are stored verbatim).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

#: Value codings for kept entries.
VALUE_CODINGS = ("f32", "f16", "bf16")
#: Quantised value widths (sign + levels): the stored widths under 16 bits.
QUANT_BITS = tuple(sorted(b for b in VALUE_BITS if b < 16))
