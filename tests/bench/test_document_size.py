"""The document-size benchmark: the same frames, two containers, sizes that add up."""

from __future__ import annotations

from pathlib import Path

from bench.document_size import measure, render
from tests.core.conftest import make_pair


def test_format_6_stores_the_same_frames_under_a_smaller_header(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    rows = measure(base, ft, tmp_path, [], points=(("dare", 0.1, 2), ("lossless", 1.0, 16)))
    assert [r["method"] for r in rows] == ["dare", "lossless"]
    for r in rows:
        stored, header = r["stored_bytes"], r["header_bytes"]
        for fmt in ("format 5", "format 6"):
            assert stored[fmt] == r["frame_bytes"] + header[fmt]
        assert header["format 6"] < header["format 5"]
        assert r["bits_per_param"]["format 6"] < r["bits_per_param"]["format 5"]
        assert (stored["format 5"] - stored["format 6"]) % 8 == 0  # headers pad to 8 bytes
    text = render({"command": "c", "machine": {}, "tasks": {"tiny": rows}})
    assert "| dare 0.1/2 |" in text and "| lossless |" in text
    assert not list(tmp_path.glob("*.slim"))  # each delta is removed once measured
