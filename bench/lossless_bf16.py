"""Lossless on real bf16 fine-tunes: Slimstore against ZipNN and lmz, in the same run.

Each fine-tune (real MiniLM fine-tunes of ``bench.finetune``, trained in float32 or under bf16
autocast) is cast to bf16 (``tests.fixtures.bf16_copy``: round to nearest even, as a bf16
release is made), then stored three ways, on the weight file alone (``model.safetensors``):

- Slimstore ``lossless`` against the bf16 base and against the fp32 base (a whole delta
  file, document included); decompress = ``core.reconstruct.reconstruct`` to disk;
- ZipNN (``zipnn``, byte grouping + Huffman) on the fine-tune's bytes alone, and on its XOR
  with the *aligned* base: a file laid out exactly as the fine-tune's, each tensor replaced by
  its base twin (the same pairing Slimstore makes, ``bert.`` prefix included), the rest zero.
  ZipNN's own delta (``delta_compressed_type="byte"``) is this XOR of two equal-length
  buffers; the aligned base is the most favourable input it can be given;
- lmz (``lmzip`` on PyPI, rANS on bf16 bit-fields) on the fine-tune alone, and as a delta:
  an archive of the aligned base then the fine-tune (lmz codes a tensor against an earlier
  member's tensor of the same name, dtype and size), minus the archive of the aligned base.

Neither competitor can take an fp32 base for a bf16 fine-tune (ZipNN XORs equal-length
buffers, lmz pairs equal dtypes): against the base cast to bf16 by hand they get their
bf16-base figures, since that cast is the bf16 base.

Speeds are MB/s of the fine-tune's weight file, medians of ``--rounds`` alternating rounds,
beside the host's ceilings measured in the same rounds (numpy copy; zstd level 1 on one
thread over the same bytes). Usage::

    python -m bench lossless-bf16 --out bench/results/lossless-bf16-full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS = "model.safetensors"
FINETUNES = ("tiny", "tiny-autocast", "rotten_tomatoes", "tweets")


NOTES = (
    "slimstore: the whole delta file of the weight file (document, header frame, every "
    "tensor), compressed by `core.compress.compress` and rebuilt to disk by "
    '`core.reconstruct.reconstruct` (both hash what they read and write). "planes only": '
    "Slimstore's lossless coder alone, in memory, over the tensors it codes against the base "
    "(ratio and speed of those bytes): `v4 xor` is the format-4 coder (XOR planes), `v5 ulp` "
    "this version's (zigzagged ulp distance planes), same run.",
    "zipnn: `ZipNN(input_format='byte', bytearray_dtype='float16')` — its `bfloat16` mode does "
    "not round trip in zipnn 0.5.4 here (the decoder returns other bytes); `float16` groups "
    'the same two byte planes, writes as many bytes and round-trips. "delta": ZipNN on the '
    "XOR of the fine-tune and the aligned base (what its `delta_compressed_type='byte'` "
    "computes), decompress includes undoing the XOR.",
    "lmz delta: archive(aligned base, fine-tune) − archive(aligned base); lmz coded all the "
    "fine-tune's tensors as deltas (`lmz_delta_coded_bytes`); its speeds are the differences "
    "of the two archives' times, so noisy. lmz's `level` (1, 9, 19) changes its delta by "
    "< 0.01%.",
    "fp32 base: neither competitor can use it for a bf16 fine-tune (ZipNN XORs equal-length "
    "buffers, lmz pairs tensors of equal dtype); given the base cast to bf16 by hand they "
    "get their bf16-base figures, that cast being the bf16 base.",
    "Fine-tunes: `tiny` = `tests.fixtures.tiny_finetune_dir()` (rotten_tomatoes, 50 steps of "
    "32, fp32 training), `tiny-autocast` = the same recipe under bf16 autocast (AMX), both "
    "saved in fp32 and cast to bf16 as a bf16 release is; `rotten_tomatoes` and `tweets` = "
    "the benchmark's 770-step fine-tunes (`bench.finetune.full_recipe`), cast the same way.",
)


def finetune_dir(name: str) -> Path:
    """The float32 directory of a named fine-tune (trained or reused from the cache)."""
    from bench.finetune import Recipe, full_recipe, make_finetune
    from tests.fixtures import TINY_RECIPE, tiny_finetune_dir

    if name == "tiny":
        return tiny_finetune_dir()
    if name == "tiny-autocast":  # the tiny recipe under bf16 autocast (AMX on this host)
        r = TINY_RECIPE
        return make_finetune(
            Recipe(task=r.task, steps=r.steps, train_subset=r.train_subset, bf16=True),
            verbose=False,
        )
    return make_finetune(full_recipe(name), verbose=False)


def weights_only(src: Path, dst: Path) -> Path:
    """A directory holding only ``src``'s weight file (hard-linked when possible)."""
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / WEIGHTS).exists():
        return dst
    try:
        os.link(src / WEIGHTS, dst / WEIGHTS)
    except OSError:
        shutil.copyfile(src / WEIGHTS, dst / WEIGHTS)
    return dst


def aligned_base(base: Path, ft: Path, out: Path) -> Path | None:
    """The fine-tune's weight file with each tensor's bytes replaced by its base twin's (zeros
    where it has none), header included; None when a twin has another dtype."""
    from core.workspace import Workspace

    with Workspace(base, ft) as ws:
        header = ws.ft.headers[WEIGHTS]
        buf = bytearray(header.raw) + bytearray(
            max(i.end for i in header.tensors.values()) if header.tensors else 0
        )
        at = len(header.raw)
        for plan in ws.plans:
            if plan.kind != "delta":
                continue
            twin = ws.base.tensors[plan.base_name or ""].info
            if twin.dtype != plan.dtype:
                return None
            info = header.tensors[plan.name]
            buf[at + info.start : at + info.end] = ws.base.read_bytes(twin.name, 0, twin.nbytes)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS).write_bytes(bytes(buf))
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    got = fn()
    return time.perf_counter() - t, got


class Tools:
    """The coders measured: each entry returns (compressed bytes, compress s, decompress s)
    and checks its round trip."""

    def __init__(self, lmz_path: str | None) -> None:
        import zipnn

        self.zipnn_version = getattr(zipnn, "__version__", "?")
        self.lmz: Any = None
        self.lmz_why = ""
        if lmz_path:
            sys.path.insert(0, str(Path(lmz_path).resolve()))
        try:
            import lmz

            self.lmz, self.lmz_version = lmz, lmz.__version__
        except ImportError as exc:
            self.lmz_why = f"lmz not importable: {exc}"

    def slimstore(self, base: Path, ft: Path, tmp: Path) -> tuple[int, float, float]:
        from core.compress import compress
        from core.reconstruct import reconstruct

        delta = tmp / "d.slim"
        tc, _ = timed(lambda: compress(base, ft, delta, method="lossless"))
        shutil.rmtree(tmp / "rec", ignore_errors=True)
        td, _ = timed(lambda: reconstruct(base, delta, tmp / "rec"))
        if (tmp / "rec" / WEIGHTS).read_bytes() != (ft / WEIGHTS).read_bytes():
            raise AssertionError("slimstore round trip differs")
        return delta.stat().st_size, tc, td

    def zipnn(self, ft: Path, base: Path | None) -> tuple[int, float, float]:
        from zipnn import ZipNN

        # zipnn 0.5.4's "bfloat16" mode does not round trip here (its decoder returns other
        # bytes); "float16" groups the same two byte planes, writes as many bytes (45.4 MB tiny
        # fine-tune: 30,226,245 both) and round-trips.
        z = ZipNN(input_format="byte", bytearray_dtype="float16", threads=os.cpu_count() or 1)
        data = (ft / WEIGHTS).read_bytes()
        other = None if base is None else np.frombuffer((base / WEIGHTS).read_bytes(), np.uint8)

        def enc() -> bytes:
            if other is None:
                return bytes(z.compress(data))
            return bytes(z.compress(np.bitwise_xor(np.frombuffer(data, np.uint8), other).data))

        tc, comp = timed(enc)

        def dec() -> bytes:
            raw = bytes(z.decompress(comp))
            if other is None:
                return raw
            return np.bitwise_xor(np.frombuffer(raw, np.uint8), other).tobytes()

        td, back = timed(dec)
        if back != data:
            raise AssertionError("zipnn round trip differs")
        return len(comp), tc, td

    def lmz_plain(self, ft: Path, tmp: Path) -> tuple[int, float, float]:
        arc = tmp / "ft.lmz"
        tc, _ = timed(lambda: self.lmz.compress(str(ft / WEIGHTS), str(arc)))
        out = tmp / "lmz-out.safetensors"  # a one-file archive decompresses to a file
        out.unlink(missing_ok=True)
        td, _ = timed(lambda: self.lmz.decompress(str(arc), str(out), overwrite=True))
        if out.read_bytes() != (ft / WEIGHTS).read_bytes():
            raise AssertionError("lmz round trip differs")
        return arc.stat().st_size, tc, td

    def lmz_delta(self, ft: Path, aligned: Path, tmp: Path) -> tuple[int, float, float, int]:
        """The archive of (aligned base, fine-tune) minus that of the aligned base; times are
        the pair's minus the base's. Also returns the bytes lmz coded as deltas."""
        pair, solo = tmp / "pair", tmp / "solo"
        for d in (pair, solo):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        os.link(aligned / WEIGHTS, pair / "a-base.safetensors")
        os.link(aligned / WEIGHTS, solo / "a-base.safetensors")
        os.link(ft / WEIGHTS, pair / "b-ft.safetensors")
        sizes, tcs, tds, stats = [], [], [], None
        for d in (pair, solo):
            arc = tmp / f"{d.name}.lmz"
            tc, stats_d = timed(lambda d=d, arc=arc: self.lmz.compress(str(d), str(arc)))
            out = tmp / f"{d.name}-out"
            shutil.rmtree(out, ignore_errors=True)
            td, _ = timed(
                lambda arc=arc, out=out: self.lmz.decompress(str(arc), str(out), overwrite=True)
            )
            sizes.append(arc.stat().st_size)
            tcs.append(tc)
            tds.append(td)
            stats = stats if stats is not None else stats_d
        back = (tmp / "pair-out" / "b-ft.safetensors").read_bytes()
        if back != (ft / WEIGHTS).read_bytes():
            raise AssertionError("lmz delta round trip differs")
        delta_bytes = int(stats.detail.get("delta_bytes", 0)) if stats is not None else 0
        return sizes[0] - sizes[1], tcs[0] - tcs[1], tds[0] - tds[1], delta_bytes


def plane_pairs(base: Path, ft: Path) -> list[tuple[bytes, bytes, int]]:
    """(fine-tune bytes, base bytes, width) of every tensor Slimstore codes against the base."""
    from core.constants import DTYPES
    from core.workspace import Workspace

    out = []
    with Workspace(base, ft) as ws:
        for plan in ws.plans:
            if plan.kind != "delta":
                continue
            width = DTYPES[plan.dtype][0]
            twin = ws.base.tensors[plan.base_name or ""].info
            if twin.dtype != plan.dtype:
                continue
            out.append(
                (
                    ws.ft.read_bytes(plan.name, 0, plan.numel * width),
                    ws.base.read_bytes(twin.name, 0, twin.nbytes),
                    width,
                )
            )
    return out


def planes_only(pairs: list[tuple[bytes, bytes, int]], residual: str) -> tuple[int, float, float]:
    """Slimstore's lossless coder alone, in memory (no files, hashes or document): the planes
    of every tensor with ``residual`` (``xor``: format version 4; ``ulp``: version 5), coded
    and rebuilt 8 MiB at a time as ``compress``/``reconstruct`` do."""
    from core.constants import PIECE_BYTES, ZSTD_LEVEL
    from core.xor import XorEncoder, XorPlanes

    coded = []
    t = time.perf_counter()
    for ft, base, w in pairs:
        enc = XorEncoder(w, len(ft) // w, ZSTD_LEVEL, residual)
        for i in range(0, len(ft), PIECE_BYTES):
            enc.add(ft[i : i + PIECE_BYTES], base[i : i + PIECE_BYTES])
        coded.append(enc.finish())
    tc = time.perf_counter() - t
    rebuilt = []
    t = time.perf_counter()
    for (ft, base, w), (frame, sizes) in zip(pairs, coded, strict=True):
        planes = XorPlanes(frame, w, len(ft) // w, sizes, residual)
        for i in range(0, len(ft), PIECE_BYTES):
            items = np.frombuffer(base[i : i + PIECE_BYTES], f"<u{w}").copy()
            planes.xor_into(items, planes.inflate(len(items)))
            rebuilt.append(items)
        planes.finish()
    td = time.perf_counter() - t
    if b"".join(r.tobytes() for r in rebuilt) != b"".join(ft for ft, _, _ in pairs):
        raise AssertionError(f"{residual} planes do not round trip")
    return sum(len(f) for f, _ in coded), tc, td


def ceilings(ft: Path) -> tuple[float, float, float]:
    """Seconds for a numpy copy, zstd-1 compress and decompress (one thread) of the file."""
    import zstandard

    data = (ft / WEIGHTS).read_bytes()
    arr = np.frombuffer(data, np.uint8)
    tcopy, _ = timed(lambda: arr.copy())
    tc, comp = timed(lambda: zstandard.ZstdCompressor(level=1).compress(data))
    td, _ = timed(lambda: zstandard.ZstdDecompressor().decompress(comp))
    return tcopy, tc, td


def measure(name: str, tools: Tools, work: Path, rounds: int) -> dict[str, Any]:
    from tests.fixtures import base_dir, bf16_copy

    ft32 = finetune_dir(name)
    root = work / name
    b32 = weights_only(base_dir(), root / "b32")
    b16 = bf16_copy(b32, root / "b16")
    f16 = bf16_copy(weights_only(ft32, root / "f32"), root / "f16")
    aligned = aligned_base(b16, f16, root / "aligned16")
    assert aligned is not None
    from core.checkpoint import CheckpointDir

    with CheckpointDir.open(f16) as c:
        params = sum(r.info.numel for r in c.tensors.values())
    size = (f16 / WEIGHTS).stat().st_size
    runs: dict[str, list[tuple[float, ...]]] = {}
    extra: dict[str, Any] = {}
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    pairs = plane_pairs(b16, f16)
    coded_bytes = sum(len(ft) for ft, _, _ in pairs)
    coded_params = sum(len(ft) // w for ft, _, w in pairs)
    for _ in range(rounds):
        runs.setdefault("ceiling", []).append(ceilings(f16))
        for residual, label in (("xor", "v4 xor"), ("ulp", "v5 ulp")):
            key = f"slimstore planes only, {label}/bf16 base"
            runs.setdefault(key, []).append(planes_only(pairs, residual))
        runs.setdefault("slimstore/bf16 base", []).append(tools.slimstore(b16, f16, tmp))
        runs.setdefault("slimstore/fp32 base", []).append(tools.slimstore(b32, f16, tmp))
        runs.setdefault("zipnn", []).append(tools.zipnn(f16, None))
        runs.setdefault("zipnn delta/bf16 base", []).append(tools.zipnn(f16, aligned))
        if tools.lmz is not None:
            runs.setdefault("lmz", []).append(tools.lmz_plain(f16, tmp))
            *got, extra["lmz_delta_coded_bytes"] = tools.lmz_delta(f16, aligned, tmp)
            runs.setdefault("lmz delta/bf16 base", []).append(tuple(got))
    ceil = runs.pop("ceiling")
    tcopy, tzc, tzd = (statistics.median(r[i] for r in ceil) for i in range(3))
    mb = size / 1e6
    row: dict[str, Any] = {
        "finetune": name,
        "params": params,
        "weights_bytes": size,
        "planes_only_input_bytes": coded_bytes,
        "planes_only_params": coded_params,
        "ceiling_MBps": {
            "copy": mb / tcopy,
            "zstd1_compress": mb / tzc,
            "zstd1_decompress": mb / tzd,
        },
        "coders": {},
        **extra,
    }
    for coder, rs in runs.items():
        comp = statistics.median(r[0] for r in rs)
        tc = statistics.median(r[1] for r in rs)
        td = statistics.median(r[2] for r in rs)
        # the planes alone cover the tensors coded against the base, not the whole file
        n_in, p_in = (coded_bytes, coded_params) if "planes only" in coder else (size, params)
        row["coders"][coder] = {
            "bytes": int(comp),
            "ratio": n_in / comp,
            "bits_per_param": comp * 8 / p_in,
            "compress_MBps": n_in / 1e6 / tc if tc > 0 else float("nan"),
            "decompress_MBps": n_in / 1e6 / td if td > 0 else float("nan"),
        }
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Lossless on bf16 fine-tunes: Slimstore vs ZipNN vs lmz",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; {meta.get('load', 'host load not recorded')}. Compare",
        "speeds with the ceilings measured in the same rounds.",
        "",
        "Ratio = the bf16 weight file's bytes / the stored bytes (bigger is better); bits/param",
        "= stored bits / parameters. Speeds: MB/s of the bf16 weight file, medians of "
        f"{meta['rounds']} rounds.",
        "",
    ]
    lines += [f"- {note}" for note in NOTES] + [""]
    for r in rows:
        c = r["ceiling_MBps"]
        lines += [
            f"## {r['finetune']} ({r['params'] / 1e6:.1f} M params, "
            f"{r['weights_bytes'] / 1e6:.1f} MB bf16)",
            "",
            f"Ceilings: copy {c['copy']:.0f} MB/s, zstd -1 {c['zstd1_compress']:.0f} / "
            f"{c['zstd1_decompress']:.0f} MB/s (compress / decompress, one thread).",
            "",
            "| coder | stored bytes | ratio | bits/param | compress MB/s | decompress MB/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, v in r["coders"].items():
            lines.append(
                f"| {name} | {v['bytes']:,} | {v['ratio']:.2f} | {v['bits_per_param']:.2f} | "
                f"{v['compress_MBps']:.0f} | {v['decompress_MBps']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetunes", default=",".join(FINETUNES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--lmz-path",
        default=None,
        help="a directory lmzip was pip-installed into (default: the venv's)",
    )
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")


def main(args: argparse.Namespace) -> int:
    tools = Tools(args.lmz_path)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lossless-bf16-"))
    rows = []
    for name in args.finetunes.split(","):
        row = measure(name, tools, work, args.rounds)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    meta = {
        "command": "python -m bench lossless-bf16 " + " ".join(sys.argv[2:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"({platform.platform()})",
        "rounds": args.rounds,
        "load": f"1-minute load average {os.getloadavg()[0]:.1f} when it ended",
        "zipnn": tools.zipnn_version,
        "lmz": getattr(tools, "lmz_version", tools.lmz_why),
    }
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(markdown(rows, meta) + "\n")
    print(markdown(rows, meta))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0
