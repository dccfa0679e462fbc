"""``python -m bench load`` end to end at a tiny size, embedded stack (the full run is a
benchmark)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import load
from bench.harness import synthetic_pair

pytestmark = pytest.mark.slow


def test_load_benchmark_runs_without_errors(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    argv = ["--stack", "embedded", "--pulls", "3", "--uploads", "2", "--seconds", "2"]
    args = parser.parse_args([*argv, "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
    result = load.run(args, models=synthetic_pair(tmp_path / "models", params=1 << 19))
    (stack,) = result["stacks"]
    phases = list(load._phases(stack))
    assert len(phases) == 6 and all(p["errors"] == 0 for p in phases), phases
    assert all(p["bytes"] > 0 and p["api_peak_rss_mib"] > 0 for p in phases), phases
    assert stack["pulls"]["lossless"]["many"]["ttfb_n"] >= 3
    load.write_results(result, tmp_path / "out")
    text = (tmp_path / "out" / "load.md").read_text()
    assert "| magnitude pulls × 3 | 3 |" in text and "| 2 uploads / 1, ingest |" in text
