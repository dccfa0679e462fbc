"""Offline ``slim compress`` and the service's worker reach a compression through one core
entry point with one set of defaults: the same inputs give the same call and the same choice.

(They used to differ: argparse's ``--keep 0.01`` / ``--value-bits 16`` defaults pinned
``auto`` offline to one keep and width, while the worker let it search both.)
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import core.auto
import core.compress
from cli.main import main
from core.delta_format import DeltaReader
from core.evaluate import Example, load_calibration
from core.params import CompressOutcome, CompressParams, Method
from worker.runner import Worker


def _worker_run(
    method: str, params: dict[str, Any], base: Path, ft: Path, out: Path
) -> CompressOutcome:
    """The worker's own ``_run_compress`` on a stored ``params`` row (no database: it only
    needs its device option and a lease's progress callback)."""
    fake = SimpleNamespace(options=SimpleNamespace(device=None))
    lease = SimpleNamespace(progress=lambda info: None)
    asked = CompressParams.from_row(params, method=method)
    return Worker._run_compress(fake, asked, base, ft, out, lease)  # type: ignore[arg-type]


def _service_params(calibration: Path, **extra: Any) -> dict[str, Any]:
    """What the service stores for ``slim push --min-fidelity 0.99 --calibration FILE``."""
    examples = [json.loads(line) for line in calibration.read_text().splitlines() if line]
    return {
        "keep": None,
        "value_bits": None,
        "evaluation": "fidelity",
        "min_fidelity": 0.99,
        "seed": 0,
        "options": {},
        "calibration": [{"text": e["text"], "label": e.get("label")} for e in examples],
        **extra,
    }


def test_offline_and_worker_call_auto_with_the_same_arguments(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise SystemExit(0)  # stop here: only the call is compared

    monkeypatch.setattr(core.auto, "auto_compress", record)
    base, ft, cal = tiny_models["base"], tiny_models["ft"], tiny_models["calibration"]
    with pytest.raises(SystemExit):
        main(
            [
                "compress",
                str(base),
                str(ft),
                "-o",
                str(tmp_path / "o.slim"),
                "--min-fidelity",
                "0.99",
                "--calibration",
                str(cal),
                "--quiet",
            ]
        )
    with pytest.raises(SystemExit):
        _worker_run("auto", _service_params(cal), base, ft, tmp_path / "w.slim")
    offline, worker = calls
    # the same examples (read from the file offline, stored in the service), then every
    # other argument
    assert offline.pop("calibration") == load_calibration(cal, need_labels=False)
    assert worker.pop("calibration") == load_calibration(cal, need_labels=False)
    offline.pop("progress"), worker.pop("progress")
    assert offline == worker
    assert offline["keep"] is None and offline["value_bits"] is None  # searched, not pinned


def test_offline_and_worker_reach_the_same_choice(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    base, ft, cal = tiny_models["base"], tiny_models["ft"], tiny_models["calibration"]
    # the whole ladder, searched candidates included (one generation keeps the runs short)
    assert (
        main(
            [
                "compress",
                str(base),
                str(ft),
                "-o",
                str(tmp_path / "o.slim"),
                "--method",
                "auto",
                "--min-fidelity",
                "0.95",
                "--generations",
                "1",
                "--calibration",
                str(cal),
                "--quiet",
            ]
        )
        == 0
    )
    params = _service_params(cal, min_fidelity=0.95, options={"generations": 1})
    r = _worker_run("auto", params, base, ft, tmp_path / "w.slim")
    trails = []
    for name in ("o.slim", "w.slim"):
        with DeltaReader(tmp_path / name) as reader:
            trails.append(reader.doc.method["auto"]["trail"])
    # timings differ, and with them the length of the notes in the document (a few bytes)
    timing = ("seconds", "bits_per_param")
    strip = [[{k: v for k, v in s.items() if k not in timing} for s in t] for t in trails]
    assert strip[0] == strip[1] and len(strip[0]) >= 2
    # the document's timing text differs by a few bytes between runs: the frames do not
    assert trails[0][-1]["bits_per_param"] == pytest.approx(
        trails[1][-1]["bits_per_param"], rel=1e-3
    )
    assert r.method == f"auto:{trails[0][-1]['encoded']}"


def test_non_auto_defaults_are_written_once(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(core.compress, "compress", record)
    base, ft = tiny_models["base"], tiny_models["ft"]
    with pytest.raises(SystemExit):
        main(
            [
                "compress",
                str(base),
                str(ft),
                "-o",
                str(tmp_path / "x.slim"),
                "--keep",
                "0.01",
                "--quiet",
            ]
        )
    params = {"keep": 0.01, "value_bits": None, "evaluation": None, "seed": None, "options": {}}
    with pytest.raises(SystemExit):
        _worker_run("nps", params, base, ft, tmp_path / "y.slim")
    offline, worker = calls
    offline.pop("progress"), worker.pop("progress")
    assert offline == worker
    assert (offline["method"], offline["keep"], offline["value_bits"]) == ("nps", 0.01, 16)
    assert offline["evaluation"] == "weights"


def test_a_floor_with_a_fixed_method_is_refused(tiny_models: dict[str, Path]) -> None:
    from core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="`min_fidelity`"):
        core.compress.compress_request(
            tiny_models["base"],
            tiny_models["ft"],
            "x.slim",
            CompressParams(method=Method.DARE, min_fidelity=0.99),
        )
    assert Example("a") == Example("a")


def test_no_method_and_no_data_is_exact(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a method, calibration or a lossy choice, offline compress stores no loss."""
    from core.params import default_method

    base, ft = tiny_models["base"], tiny_models["ft"]
    assert main(["compress", str(base), str(ft), "-o", str(tmp_path / "x.slim"), "--quiet"]) == 0
    assert "lossless" in capsys.readouterr().out
    assert default_method(min_fidelity=None, calibrated=False, lossy_asked=False) == "lossless"
    assert default_method(min_fidelity=None, calibrated=False, lossy_asked=True) == "nps"
    assert default_method(min_fidelity=None, calibrated=True, lossy_asked=False) == "nps"
    assert default_method(min_fidelity=0.99, calibrated=True, lossy_asked=False) == "auto"


def test_a_long_calibration_file_is_subsampled_alike_offline_and_in_the_worker(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, ft = tiny_models["base"], tiny_models["ft"]
    lines = tiny_models["calibration"].read_text().splitlines()
    long = tmp_path / "long.jsonl"
    rows = [json.loads(lines[i % len(lines)]) for i in range(300)]
    long.write_text(
        "".join(json.dumps({**r, "text": f"{r['text']} {i}"}) + "\n" for i, r in enumerate(rows))
    )
    args = ["--method", "nps-seeded", "--keep", "0.05", "--generations", "1", "--seed", "3"]
    assert (
        main(
            [
                "compress",
                str(base),
                str(ft),
                "-o",
                str(tmp_path / "o.slim"),
                *args,
                "--calibration",
                str(long),
                "--calibration-limit",
                "40",
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    offline = json.loads(capsys.readouterr().out)
    params = _service_params(
        long, min_fidelity=None, seed=3, keep=0.05, calibration_limit=40, options={"generations": 1}
    )
    worker = _worker_run("nps-seeded", params, base, ft, tmp_path / "w.slim")
    for r in (offline, worker.to_dict()):
        assert (r["calibration_used"], r["calibration_given"]) == (40, 300)
        assert any("40 of the 300 examples" in n for n in r["notes"])
    # the same 40 examples: the same search, step for step
    assert (offline["fitness_before"], offline["fitness_after"], offline["kept"]) == (
        worker.fitness_before,
        worker.fitness_after,
        worker.kept,
    )


def test_the_calibration_limit_is_checked_by_the_cli(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "compress",
                str(tiny_models["base"]),
                str(tiny_models["ft"]),
                "-o",
                str(tmp_path / "x.slim"),
                "--calibration-limit",
                "0",
            ]
        )
    assert exc.value.code == 2
