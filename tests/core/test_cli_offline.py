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
    merged = json.loads(capsys.readouterr().out)
    assert merged["sources"] == 2 and merged["heads_from"] == str(tmp_path / "d.slim")
    deltas = [str(base), str(tmp_path / "d.slim"), str(tmp_path / "e.slim")]
    assert main(["merge", *deltas, "-o", str(tmp_path / "n.slim"), "--heads-from", "x"]) == 2
    assert "--heads-from x is not one of the merged deltas" in capsys.readouterr().err


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


def test_core_messages_name_parameters_and_the_cli_names_its_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.errors import InvalidArgument
    from core.methods.base import check_keep

    with pytest.raises(InvalidArgument) as info:
        check_keep(2.0)
    assert "`keep=0.01`" in info.value.detail and "--" not in info.value.detail
    base, ft, _, _ = make_pair(tmp_path)
    argv = ["compress", str(base), str(ft), "-o", str(tmp_path / "x.slim"), "--keep", "2"]
    assert main([*argv, "--method", "magnitude"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slim: error [invalid_argument]") and "--keep 0.01" in err, err
    assert "`" not in err


def test_unknown_format_version_cli(tmp_path: Path) -> None:
    from tests.hostile.corpus import build

    case = next(c for c in build(tmp_path / "corpus") if c.name == "delta_future_version")
    proc = _run("inspect", str(case.path))
    assert proc.returncode == 2 and "[unsupported_format_version]" in proc.stderr
    assert "upgrade" in proc.stderr


def test_cli_choices_match_the_core_registries() -> None:
    from cli import offline
    from core import compress, evaluate, merge
    from core.methods import REGISTRY
    from core.params import EVAL_KINDS, MERGE_METHODS, VALUE_BITS

    assert set(offline.METHODS) == set(REGISTRY)
    assert tuple(offline.VALUE_BITS) == tuple(VALUE_BITS)
    assert tuple(offline.EVAL_KINDS) == tuple(EVAL_KINDS)
    # core validates against the same lists (one definition, core.params)
    assert compress.VALUE_BITS is VALUE_BITS and compress.EVAL_KINDS is EVAL_KINDS
    assert merge.MERGE_METHODS is MERGE_METHODS
    assert evaluate.Example is compress.Example


def test_parser_builds_without_importing_torch() -> None:
    code = "import sys, cli.main; cli.main.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_offline_search_prints_progress_on_stderr(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "compress",
        str(tiny_models["base"]),
        str(tiny_models["ft"]),
        "-o",
        str(tmp_path / "s.slim"),
        "--method",
        "nps-seeded",
        "--keep",
        "0.05",
        "--generations",
        "2",
        "--calibration",
        str(tiny_models["calibration"]),
        "--json",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays one JSON object
    assert "search: generation 1/2, best fitness" in captured.err
    assert "search: generation 2/2" in captured.err and "None" not in captured.err
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err.count("generation") == 0


def test_progress_lines_are_readable() -> None:
    from cli.offline import progress_line

    running = {
        "phase": "auto",
        "candidate_index": 3,
        "candidates_total": 12,
        "candidate": {"method": "dare", "keep": 0.05, "value_bits": 4},
        "fidelity": None,
        "floor": 0.99,
        "passed": None,
        "elapsed_seconds": 41.2,
        "eta_seconds": None,
    }
    assert progress_line(running) == (
        "auto: candidate 3/12 dare keep 5% 4-bit: judging against floor 0.99… · 41 s elapsed"
    )
    done = running | {"fidelity": 0.9912, "passed": True, "eta_seconds": 95.0}
    assert progress_line(done) == (
        "auto: candidate 3/12 dare keep 5% 4-bit: fidelity 0.9912 ≥ floor 0.99, passed · "
        "41 s elapsed, ≈95 s left"
    )
    assert "rejected" in progress_line(done | {"fidelity": 0.98, "passed": False})
    # a search report without its planned total (older workers) shows no "None"
    line = progress_line({"phase": "search", "generation": 25, "best_fitness": 0.99})
    assert line == "search: generation 25, best fitness 0.99"


def test_inspect_labels_the_fitness_scale(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fitness_before/after are the search's −KL (≤ 0), not a 0–1 quality: labelled."""
    out = tmp_path / "n.slim"
    argv = ["compress", str(tiny_models["base"]), str(tiny_models["ft"]), "-o", str(out)]
    opts = ["--method", "nps-seeded", "--generations", "1", "--quiet"]
    assert main([*argv, *opts, "--calibration", str(tiny_models["calibration"])]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    before = next(line for line in text.splitlines() if "fitness_before" in line)
    assert float(before.split(":")[1].split()[0]) <= 0 and "−KL" in before
    assert "(on search: 72 examples)" in text


def test_interrupting_a_followed_job_says_it_goes_on(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import cli.client
    import cli.main

    class Client:
        def wait(self, job_id: str, **_: object) -> None:
            raise KeyboardInterrupt

    job = SimpleNamespace(id="job-1234567890", checkpoint_id="ckpt-42")

    def handler(args: object) -> int:
        cli.client._follow(Client(), job, quiet=True)  # type: ignore[arg-type]
        return 0

    parser = cli.main.build_parser()
    monkeypatch.setattr(cli.main, "build_parser", lambda: _with_handler(parser, handler))
    assert cli.main.main(["status", "job-1234567890", "-f"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("slim: interrupted — job job-1234567890 goes on on the server")
    assert "slim status job-1234567890 -f" in err and "cancel" in err


def _with_handler(parser: object, handler: object) -> object:
    """A parser whose parsed arguments run ``handler``."""
    import argparse

    class P:
        def parse_args(self, argv: list[str]) -> argparse.Namespace:
            return argparse.Namespace(handler=handler)

    return P()


def test_an_auto_checkpoint_shows_its_chosen_encoding_and_search_time() -> None:
    from cli.client import _summary
    from client import Checkpoint

    ckpt = Checkpoint(
        id="c1",
        name="tweets",
        base_id="b1",
        state="ready",
        method="auto",
        params={"keep": None, "value_bits": None, "min_fidelity": 0.99},
        original_bytes=91_582_704,
        stored_bytes=3_006_021,
        ratio=30.47,
        bits_per_param=0.989,
        fitness={"method": "auto:dare", "keep": 0.2, "value_bits": 8, "fidelity": 0.992},
        search_seconds=121.5,
    )
    line = _summary(ckpt)
    assert "as auto → dare, keep 20%, 8-bit" in line
    assert "fidelity 0.9920 (floor 0.99)" in line and "search 121.5 s" in line
