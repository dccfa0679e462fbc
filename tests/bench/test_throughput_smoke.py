"""``python -m bench throughput --pull-only`` end to end at the smallest fixture (the full run is
a benchmark), and its loopback ceiling server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from bench import throughput


def test_static_server_sends_the_whole_file_to_curl(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    with throughput.StaticServer(tmp_path / "f") as url:
        assert throughput.curl_get(url, "/dev/null") == len(data)
        assert throughput.curl_get(url, str(tmp_path / "copy")) == len(data)
    assert (tmp_path / "copy").read_bytes() == data


@pytest.mark.slow
def test_pull_comparison_runs_and_reports_ratios(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    args = parser.parse_args(["--params", "1e6", "--repeat", "1", "--pull-only"])
    row = throughput.pull_only(1e6, args, tmp_path / "fixtures", print)
    for method in ("lossless", "magnitude"):
        r = row["pull"][method]
        assert set(r["mbps"]) == set(throughput.PULL_MODES)
        assert all(v > 0 for v in r["mbps"].values())
        assert r["pull_vs_curl_file"] > 0 and r["pull_local_vs_pull"] > 0
    result = {"command": "test", "machine": {}, "ceilings": {"memcpy_gbps": 1.0}, "sizes": [row]}
    throughput.write(result, tmp_path, "throughput-pull")
    assert "| lossless |" in (tmp_path / "throughput-pull.md").read_text()
