"""``python -m bench load`` end to end at a tiny size (the full run is a benchmark)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import load
from bench.harness import pg_ready

pytestmark = pytest.mark.slow


def test_load_benchmark_runs_without_errors(tmp_path: Path) -> None:
    if not pg_ready():
        pytest.skip("PostgreSQL is not reachable")
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    argv = ["--streams", "4", "--uploads", "2", "--seconds", "3", "--checkpoints", "1"]
    args = parser.parse_args([*argv, "--params", str(1 << 19), "--out", str(tmp_path / "out")])
    result = load.run(tmp_path / "run", args)
    assert result["pulls"]["requests"] > 0 and result["pulls"]["errors"] == 0, result
    assert result["uploads"]["requests"] > 0 and result["uploads"]["errors"] == 0, result
    assert result["api_peak_rss_bytes"] and result["api_alive_after"]
    load.write_results(result, tmp_path / "out")
    assert "| 4 concurrent pulls |" in (tmp_path / "out" / "load.md").read_text()
