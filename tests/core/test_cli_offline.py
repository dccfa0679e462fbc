"""The offline `slim` verbs: JSON output and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from tests.core.conftest import make_pair

KEYS = {
    "method",
    "keep",
    "value_bits",
    "stored_bytes",
    "original_bytes",
    "ratio",
    "bits_per_param",
    "fitness_before",
    "fitness_after",
    "search_seconds",
    "evaluations",
}


def test_compress_inspect_reconstruct_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    assert (
        main(
            [
                "compress",
                str(base),
                str(ft),
                "-o",
                str(tmp_path / "d.slim"),
                "--method",
                "dare",
                "--keep",
                "0.1",
                "--value-bits",
                "4",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= KEYS and out["method"] == "dare" and out["value_bits"] == 4
    assert main(["inspect", str(tmp_path / "d.slim"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= KEYS and info["stored_bytes"] == out["stored_bytes"]
    assert info["bits_per_param"] == pytest.approx(out["bits_per_param"])
    assert (
        main(
            [
                "reconstruct",
                str(base),
                str(tmp_path / "d.slim"),
                "-o",
                str(tmp_path / "out"),
                "--scale",
                "0.5",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (
        main(
            [
                "compress",
                str(base),
                str(ft),
                "-o",
                str(tmp_path / "e.slim"),
                "--method",
                "magnitude",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "merge",
                str(base),
                str(tmp_path / "d.slim"),
                str(tmp_path / "e.slim"),
                "-o",
                str(tmp_path / "m.slim"),
                "--method",
                "ties",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["sources"] == 2


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120
    )


def test_user_mistakes_print_one_line_and_exit_2(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "other").mkdir()
    import torch

    from core.safetensors_io import save_file

    save_file({"x": torch.zeros(3)}, tmp_path / "other" / "model.safetensors")
    cases = {
        "invalid_checkpoint": [
            "compress",
            str(tmp_path / "missing"),
            str(ft),
            "-o",
            str(tmp_path / "x.slim"),
        ],
        "invalid_checkpoint ": [
            "compress",
            str(base),
            str(tmp_path / "empty"),
            "-o",
            str(tmp_path / "x.slim"),
        ],
        "base_mismatch": [
            "compress",
            str(base),
            str(tmp_path / "other"),
            "-o",
            str(tmp_path / "x.slim"),
        ],
        "invalid_calibration": [
            "compress",
            str(base),
            str(ft),
            "-o",
            str(tmp_path / "x.slim"),
            "--method",
            "nps",
            "--calibration",
            str(tmp_path / "bad.jsonl"),
        ],
        "invalid_delta": ["inspect", str(tmp_path / "bad.jsonl")],
    }
    for code, argv in cases.items():
        proc = _run(*argv)
        assert proc.returncode == 2, (code, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"[{code.strip()}]" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_unknown_format_version_cli(tmp_path: Path) -> None:
    from tests.hostile.corpus import build

    case = next(c for c in build(tmp_path / "corpus") if c.name == "delta_future_version")
    proc = _run("inspect", str(case.path))
    assert proc.returncode == 2 and "[unsupported_format_version]" in proc.stderr
    assert "upgrade" in proc.stderr


def test_cli_choices_match_the_core_registries() -> None:
    from cli import offline
    from core.compress import VALUE_BITS
    from core.evaluate import EVAL_KINDS
    from core.merge import MERGE_METHODS
    from core.methods import REGISTRY

    assert set(offline.METHODS) == set(REGISTRY)
    assert tuple(offline.VALUE_BITS) == tuple(VALUE_BITS)
    assert tuple(offline.EVAL_KINDS) == tuple(EVAL_KINDS)
    assert tuple(offline.MERGE_METHODS) == tuple(MERGE_METHODS)


def test_parser_builds_without_importing_torch() -> None:
    code = "import sys, cli.main; cli.main.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
