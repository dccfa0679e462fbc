"""A generated corpus of hostile inputs, each with the error code it must produce.

``build(directory)`` writes every file and returns the cases. The corpus is kept in the
repository under ``tests/hostile/files/`` (one file per case plus ``manifest.json``, which
lists every case, its kind, the code the core must raise and the code the service answers);
regenerate it with ``python -m tests.hostile.corpus`` (default output: that directory) —
``tests/hostile/test_service_hostile.py`` checks the checked-in copy is what this script
writes.

Kinds:
    safetensors   a weight file the parser must refuse (uploaded: refused as it streams)
    delta         a stored delta the reader must refuse (``slim reconstruct``; planted as a
                  checkpoint's delta in the service: the pull fails with the code)
    calibration   a calibration JSONL file (``slim push --calibration``; its examples sent in
                  the create request)
    path          a file name (``paths.json``): refused by name
    model         a well-formed fine-tune that does not fit the base (``_base``): refused at
                  commit, or its job fails with the code (NaN / Inf need the tensor data)
    limit         inputs over the service limits of :data:`HOSTILE_LIMITS` (service only)
    stored        tampering with what the server stores (no input file; service only)
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import zstandard

from core.compress import compress
from core.constants import PACKED_KEY
from core.delta_format import pack_document, unpack_document
from core.safetensors_io import save_file


@dataclass(frozen=True)
class Case:
    name: str
    path: Path | None  # None for "stored" cases
    kind: str  # safetensors | delta | calibration | path | model | limit | stored
    code: (
        str  # the stable error code expected (from the core, or the service for service-only kinds)
    )
    service: str | None = None  # the code the service answers, when it differs from ``code``

    @property
    def service_code(self) -> str:
        return self.service or self.code


#: Service settings the ``limit`` cases are written against.
HOSTILE_LIMITS = {
    "max_file_bytes": 64 * 1024,
    "max_header_bytes": 16 * 1024,
    "max_tensors_per_file": 64,
    "max_calibration_examples": 16,
    "max_json_body_bytes": 64 * 1024,
}

#: How the service answers parser cases differently from the core: a body that ends early is
#: ``truncated`` (an interrupted upload, worth sending again), and a declared header length no
#: safetensors file could have is ``invalid_safetensors`` (not a size-limit problem).
SERVICE_CODES = {
    "header_bomb": "invalid_safetensors",  # a 2**40-byte header: not safetensors at all
    "length_max_u64": "invalid_safetensors",
    "empty_file": "truncated",
    "seven_bytes": "truncated",
    "length_only": "truncated",
    "length_bigger_than_file": "truncated",
    "truncated_data": "truncated",
    "offsets_past_end": "truncated",
}


def _header(doc: dict, pad: bool = True) -> bytes:
    body = json.dumps(doc).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def _tensor(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def safetensors_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected code)."""
    ok = {"w": _tensor("F32", [2, 2], 0, 16)}
    data16 = b"\0" * 16
    cases: dict[str, tuple[bytes, str]] = {
        "empty_file": (b"", "invalid_safetensors"),
        "seven_bytes": (b"\x01" * 7, "invalid_safetensors"),
        "length_only": (struct.pack("<Q", 16), "invalid_safetensors"),
        "length_bigger_than_file": (struct.pack("<Q", 4096) + b"{}", "invalid_safetensors"),
        "header_bomb": (struct.pack("<Q", 2**40) + b"{}", "header_too_large"),
        "header_just_over_cap": (
            struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{",
            "header_too_large",
        ),
        "length_max_u64": (b"\xff" * 8 + b"{}", "header_too_large"),
        "invalid_utf8": (struct.pack("<Q", 8) + b'{\xff\xfe"a":1}'[:8], "invalid_safetensors"),
        "not_json": (struct.pack("<Q", 8) + b"not json", "invalid_safetensors"),
        "json_array": (_header([1, 2, 3]), "invalid_safetensors"),  # type: ignore[arg-type]
        "json_string": (_header("hello"), "invalid_safetensors"),  # type: ignore[arg-type]
        "truncated_json": (struct.pack("<Q", 10) + b'{"w": {"dt', "invalid_safetensors"),
        "truncated_data": (_header(ok) + b"\0" * 8, "invalid_safetensors"),
        "trailing_bytes": (_header(ok) + data16 + b"\0" * 5, "invalid_safetensors"),
        "unknown_dtype": (
            _header({"w": _tensor("F128", [2], 0, 32)}) + b"\0" * 32,
            "invalid_safetensors",
        ),
        "dtype_not_string": (
            _header({"w": _tensor(7, [2], 0, 8)}) + b"\0" * 8,
            "invalid_safetensors",
        ),  # type: ignore[arg-type]
        "shape_mismatch_span": (
            _header({"w": _tensor("F32", [3, 3], 0, 16)}) + data16,
            "invalid_safetensors",
        ),
        "negative_shape": (
            _header({"w": _tensor("F32", [-1, 4], 0, 16)}) + data16,
            "invalid_safetensors",
        ),
        "float_shape": (
            _header({"w": _tensor("F32", [2.0, 2], 0, 16)}) + data16,
            "invalid_safetensors",
        ),  # type: ignore[list-item]
        "shape_not_list": (
            _header({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}) + data16,
            "invalid_safetensors",
        ),
        "huge_shape_product": (
            _header({"w": _tensor("F32", [2**31, 2**31, 2**31], 0, 16)}) + data16,
            "invalid_safetensors",
        ),
        "offsets_reversed": (
            _header({"w": _tensor("F32", [2, 2], 16, 0)}) + data16,
            "invalid_safetensors",
        ),
        "offsets_missing": (
            _header({"w": {"dtype": "F32", "shape": [2, 2]}}) + data16,
            "invalid_safetensors",
        ),
        "offsets_three": (
            _header({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8, 16]}}) + data16,
            "invalid_safetensors",
        ),
        "offsets_overlap": (
            _header({"a": _tensor("F32", [2, 2], 0, 16), "b": _tensor("F32", [2, 2], 8, 24)})
            + b"\0" * 24,
            "invalid_safetensors",
        ),
        "offsets_hole": (
            _header({"a": _tensor("F32", [2], 0, 8), "b": _tensor("F32", [2], 16, 24)})
            + b"\0" * 24,
            "invalid_safetensors",
        ),
        "offsets_past_end": (
            _header({"w": _tensor("F32", [2, 2], 0, 16)}) + b"\0" * 12,
            "invalid_safetensors",
        ),
        "offsets_negative": (
            _header({"w": _tensor("F32", [2], -8, 0)}) + b"",
            "invalid_safetensors",
        ),
        "duplicate_names": (
            struct.pack("<Q", 120)
            + b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'.ljust(
                120
            ),
            "invalid_safetensors",
        ),
        "metadata_not_strings": (
            _header({"__metadata__": {"a": 1}, **ok}) + data16,
            "invalid_safetensors",
        ),
        "metadata_not_object": (
            _header({"__metadata__": [1], **ok}) + data16,
            "invalid_safetensors",
        ),
        "entry_not_object": (_header({"w": [1, 2]}) + data16, "invalid_safetensors"),
        "empty_name": (
            _header({"": _tensor("F32", [2, 2], 0, 16)}) + data16,
            "invalid_safetensors",
        ),
        "nul_in_name": (
            _header({"w\u0000x": _tensor("F32", [2, 2], 0, 16)}) + data16,
            "invalid_safetensors",
        ),
        "pickle_disguised": (b"\x80\x04\x95" + b"\0" * 64, "invalid_safetensors"),
        "zip_disguised": (b"PK\x03\x04" + b"\0" * 64, "invalid_safetensors"),
        "bool_offsets": (
            _header({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [False, 16]}}) + data16,
            "invalid_safetensors",
        ),
        "zero_size_with_bytes": (
            _header({"w": _tensor("F32", [0, 4], 0, 16)}) + data16,
            "invalid_safetensors",
        ),
        "offsets_out_of_order": (
            _header({"b": _tensor("F32", [2], 8, 16), "a": _tensor("F32", [2], 8, 16)}) + data16,
            "invalid_safetensors",
        ),
        "header_only_whitespace": (struct.pack("<Q", 8) + b" " * 8, "invalid_safetensors"),
        "deeply_nested_json": (_nested_header(5000) + b"\0" * 8, "invalid_safetensors"),
    }
    return cases


def _nested_header(depth: int) -> bytes:
    """A header whose one tensor entry carries ``depth`` nested arrays (a recursion bomb)."""
    doc = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":%s}}' % (
        "[" * depth + "]" * depth
    )
    body = doc.encode() + b" " * (-len(doc) % 8)
    return struct.pack("<Q", len(body)) + body


def model_cases(root: Path) -> dict[str, tuple[bytes, str]]:
    """Well-formed fine-tunes of ``_base`` that must still be refused."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(32, 16, generator=g), torch.randn(32, generator=g)
    nan = w.clone()
    nan[3, 4] = float("nan")
    inf = w.clone()
    inf[0, 0] = float("inf")
    tables = {
        "model_nan_values": ({"a.weight": nan, "a.bias": b}, "invalid_checkpoint"),
        "model_inf_values": ({"a.weight": inf, "a.bias": -b}, "invalid_checkpoint"),
        "model_zero_size_tensors": (
            {"a.weight": torch.zeros(0, 16), "a.bias": torch.zeros(0)},
            "base_mismatch",
        ),
        "model_shape_mismatch": ({"a.weight": w.T.contiguous(), "a.bias": b}, "base_mismatch"),
        "model_dtype_mismatch": (
            {"a.weight": torch.zeros(32, 16, dtype=torch.int32), "a.bias": b},
            "base_mismatch",
        ),
        "model_no_shared_tensors": ({"other.weight": w}, "base_mismatch"),
    }
    out = {}
    for name, (tensors, code) in tables.items():
        path = root / f"_{name}.tmp"
        save_file(tensors, path)
        out[name] = (path.read_bytes(), code)
        path.unlink()
    return out


def limit_cases() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, suffix, service code) over :data:`HOSTILE_LIMITS`."""
    many = {f"t{i}": _tensor("F32", [1], 4 * i, 4 * i + 4) for i in range(100)}
    big_meta = {"__metadata__": {"pad": "x" * 20_000}, "w": _tensor("F32", [1], 0, 4)}
    big_file = 80 * 1024
    text = "lorem ipsum " * 2_500  # 30 KB per example
    return {
        "limit_too_many_tensors": (_header(many) + b"\0" * 400, ".safetensors", "too_many_tensors"),
        "limit_header_over_cap": (
            _header(big_meta) + b"\0" * 4,
            ".safetensors",
            "header_too_large",
        ),
        "limit_file_too_large": (
            _header({"w": _tensor("U8", [big_file], 0, big_file)}) + b"\0" * big_file,
            ".safetensors",
            "blob_too_large",
        ),
        "limit_calibration_too_many": (
            "".join(
                json.dumps({"text": f"example {i}", "label": i % 2}) + "\n" for i in range(17)
            ).encode(),
            ".jsonl",
            "invalid_calibration",
        ),
        "limit_calibration_too_large": (
            "".join(json.dumps({"text": text, "label": i % 2}) + "\n" for i in range(3)).encode(),
            ".jsonl",
            "body_too_large",
        ),
    }


#: Tampering with stored state: name -> (what is done, the code the pull answers).
STORED_CASES = {
    "stored_tampered_delta_blob": "integrity_error",  # one byte of a checkpoint's delta flipped
    "stored_tampered_base_blob": "integrity_error",  # one byte of a base weight file flipped
    "stored_truncated_delta_blob": "integrity_error",  # the delta cut short
    "stored_missing_delta_blob": "blob_not_found",  # the delta's object deleted
}


def _tiny_pair(root: Path) -> tuple[Path, Path]:
    base, ft = root / "_base", root / "_ft"
    base.mkdir(parents=True, exist_ok=True)
    ft.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    b = {"a.weight": torch.randn(32, 16, generator=g), "a.bias": torch.randn(32, generator=g)}
    f = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items()}
    save_file(b, base / "model.safetensors")
    save_file(f, ft / "model.safetensors")
    return base, ft


def delta_cases(root: Path) -> dict[str, tuple[bytes, str]]:
    base, ft = _tiny_pair(root)
    good = root / "_good.slim"
    compress(base, ft, good, method="magnitude", keep=0.2)
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    doc = json.loads(unpack_document(header["__metadata__"], good.name)[0])
    data = raw[8 + n :]

    def rebuild(new_doc: dict, new_data: bytes = data, entries: dict | None = None) -> bytes:
        h = dict(entries if entries is not None else header)
        version = new_doc.get("version")
        h["__metadata__"] = pack_document(
            json.dumps(new_doc), version if isinstance(version, int) else doc["version"]
        )
        return _header(h) + new_data

    def repacked(meta: dict) -> bytes:
        return _header({**header, "__metadata__": {**header["__metadata__"], **meta}}) + data

    cases: dict[str, tuple[bytes, str]] = {}
    cases["delta_future_version"] = (rebuild({**doc, "version": 99}), "unsupported_format_version")
    cases["delta_version_string"] = (rebuild({**doc, "version": "1"}), "unsupported_format_version")
    cases["delta_wrong_format_name"] = (rebuild({**doc, "format": "other"}), "invalid_delta")
    cases["delta_doc_not_json"] = (
        _header(
            {
                **{k: v for k, v in header.items() if k != "__metadata__"},
                "__metadata__": {"slimstore": "{nope"},
            }
        )
        + data,
        "invalid_delta",
    )
    cases["delta_no_document"] = (
        _header({k: v for k, v in header.items() if k != "__metadata__"}) + data,
        "invalid_delta",
    )
    # the packed document (version 6): not base64, a zstd bomb, or missing
    cases["delta_packed_not_base64"] = (repacked({PACKED_KEY: "%%%"}), "invalid_delta")
    packed_bomb = zstandard.ZstdCompressor(level=19).compress(b" " * (64 * 1024 * 1024))
    cases["delta_packed_bomb"] = (
        repacked({PACKED_KEY: base64.b64encode(packed_bomb).decode()}),
        "invalid_delta",
    )
    no_packed = {k: v for k, v in header["__metadata__"].items() if k != PACKED_KEY}
    cases["delta_packed_missing"] = (
        _header({**header, "__metadata__": no_packed}) + data,
        "invalid_delta",
    )
    missing = dict(doc)
    del missing["tensors"]
    cases["delta_doc_missing_field"] = (rebuild(missing), "invalid_delta")
    # flip one byte inside the first value frame: the recorded sha256 no longer matches
    val = next(name for name in header if name.startswith("t"))  # a tensor's frame
    start = header[val]["data_offsets"][-1] - 1  # its last byte: inside the values section
    tampered = bytearray(data)
    tampered[start] ^= 0xFF
    cases["delta_tampered_frame"] = (rebuild(doc, bytes(tampered)), "integrity_error")
    # a frame that inflates far beyond what the document says it holds (a zstd bomb)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 1024 * 1024))
    names = [k for k in header if k != "__metadata__"]
    blobs = {k: data[header[k]["data_offsets"][0] : header[k]["data_offsets"][1]] for k in names}
    blobs["h0"] = bomb  # the stored safetensors header: it must inflate to header_size bytes
    new_entries: dict = {}
    new_data = b""
    for k in names:
        new_entries[k] = {
            "dtype": "U8",
            "shape": [len(blobs[k])],
            "data_offsets": [len(new_data), len(new_data) + len(blobs[k])],
        }
        new_data += blobs[k]
    bomb_doc = json.loads(json.dumps(doc))
    bomb_doc["frames"]["h0"] = {"size": len(bomb), "sha256": hashlib.sha256(bomb).hexdigest()}
    cases["delta_zstd_bomb"] = (rebuild(bomb_doc, new_data, new_entries), "invalid_delta")
    # a frame named in the document that the container lacks
    ghost = json.loads(json.dumps(doc))
    ghost["frames"]["ghost"] = {"size": 4, "sha256": "0" * 64}
    cases["delta_missing_frame"] = (rebuild(ghost), "invalid_delta")
    traversal = json.loads(json.dumps(doc))
    traversal["files"][0]["path"] = "../../etc/evil.safetensors"
    cases["delta_path_traversal"] = (rebuild(traversal), "invalid_delta")
    return cases


def calibration_cases() -> dict[str, tuple[bytes, str]]:
    return {
        "calibration_not_json": (b"this is not json\n", "invalid_calibration"),
        "calibration_no_text": (b'{"label": 1}\n', "invalid_calibration"),
        "calibration_text_not_string": (b'{"text": 5}\n', "invalid_calibration"),
        "calibration_bad_label": (b'{"text": "a", "label": [1]}\n', "invalid_calibration"),
        "calibration_empty": (b"\n\n", "invalid_calibration"),
        "calibration_not_utf8": (b'{"text": "\xff\xfe"}\n', "invalid_calibration"),
        "calibration_missing_label": (b'{"text": "a"}\n', "invalid_calibration"),
    }


PATH_CASES = {
    "path_dotdot": "../model.safetensors",
    "path_nested_dotdot": "a/../../model.safetensors",
    "path_absolute": "/etc/passwd",
    "path_nul": "model\x00.safetensors",
    "path_backslash": "..\\model.safetensors",
    "path_empty": "",
    "path_dot": ".",
    "path_dot_segments": "a/./../../b.json",
    "path_trailing_dotdot": "a/b/..",
    "path_control_char": "a\x07b.json",
    "path_too_long": "a/" * 600 + "b.json",
}

#: How the service answers calibration files whose lines parse as JSON (the client sends the
#: examples in the create request; pydantic refuses malformed ones with ``validation_error``).
#: Files that do not parse at all stop in the client with the core's code.
CALIBRATION_SERVICE_CODES = {
    "calibration_no_text": "validation_error",
    "calibration_text_not_string": "validation_error",
    "calibration_bad_label": "validation_error",
    "calibration_missing_label": "invalid_calibration",
}

#: Where the checked-in corpus lives.
DEFAULT_DIR = Path(__file__).resolve().parent / "files"


def build(directory: str | Path) -> list[Case]:
    """Write the corpus into ``directory``; returns every case with its expected code."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for kind, table, suffix in (
        ("safetensors", safetensors_cases(), ".safetensors"),
        ("delta", delta_cases(root), ".slim"),
        ("calibration", calibration_cases(), ".jsonl"),
        ("model", model_cases(root), ".safetensors"),
    ):
        for name, (data, code) in table.items():
            path = root / f"{name}{suffix}"
            path.write_bytes(data)
            service = SERVICE_CODES.get(name) or CALIBRATION_SERVICE_CODES.get(name)
            cases.append(Case(name, path, kind, code, service))
    for name, (data, suffix, code) in limit_cases().items():
        path = root / f"{name}{suffix}"
        path.write_bytes(data)
        cases.append(Case(name, path, "limit", code))
    paths = root / "paths.json"
    paths.write_text(json.dumps(PATH_CASES, indent=1, sort_keys=True) + "\n")
    for name in PATH_CASES:
        cases.append(Case(name, paths, "path", "invalid_path"))
    for name, code in STORED_CASES.items():
        cases.append(Case(name, None, "stored", code))
    (root / "manifest.json").write_text(json.dumps(manifest(cases, root), indent=1) + "\n")
    return cases


def manifest(cases: list[Case], root: Path) -> list[dict[str, str | None]]:
    """The cases as JSON rows (file names relative to the corpus directory)."""
    return [
        {
            "name": c.name,
            "kind": c.kind,
            "file": c.path.relative_to(root).as_posix() if c.path else None,
            "code": c.code,
            "service_code": c.service_code,
        }
        for c in cases
    ]


def load(directory: str | Path = DEFAULT_DIR) -> list[Case]:
    """The cases of a written corpus, from its ``manifest.json``."""
    root = Path(directory)
    rows = json.loads((root / "manifest.json").read_text())
    return [
        Case(
            r["name"],
            root / r["file"] if r["file"] else None,
            r["kind"],
            r["code"],
            r["service_code"] if r["service_code"] != r["code"] else None,
        )
        for r in rows
    ]


if __name__ == "__main__":
    out = build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR)
    print(f"wrote {len(out)} cases")
