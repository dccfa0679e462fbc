"""The CLI side of issue 19's push rules and set-up edges (items 3–5), against a live embedded
service: what a default push prints, pickled files left out with a warning, ``slim base rm``
(and its 409), and the server verbs' one data directory."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from cli.main import main
from runtime.settings import Settings, default_data_dir
from tests.client.helpers import REPO
from tests.client.test_cli import run, run_json
from tests.conftest import Models, Stack


def test_default_push_says_exact_and_how_to_get_smaller(
    embedded: Stack, models: Models, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(embedded, capsys, "base", "push", str(models.base), "--name", "tiny")[0] == 0
    code, out, err = run(embedded, capsys, "push", str(models.finetune), "--base", "tiny",
                         "--name", "ft", "--wait")  # fmt: skip
    assert code == 0, err
    assert "(method lossless)" in out and "ft ready" in out
    assert "slim: warning: stored exact" in err
    assert "--min-fidelity 0.99 --calibration FILE" in err
    pushed = run_json(embedded, capsys, "push", str(models.finetune), "--base", "tiny",
                      "--name", "ft")  # fmt: skip
    assert pushed["checkpoint"]["method"] == "lossless"
    assert "stored exact" in pushed["report"]["warnings"][0]


def test_pickled_files_are_left_out_with_a_warning(
    embedded: Stack, models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ft = tmp_path / "ft"
    shutil.copytree(models.finetune, ft)
    (ft / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (ft / "training_args.bin").write_bytes(pickle.dumps({"lr": 1e-4}))
    base = tmp_path / "base"
    shutil.copytree(models.base, base)
    (base / "model.pt").write_bytes(pickle.dumps([1]))
    code, _, err = run(embedded, capsys, "base", "push", str(base), "--name", "tiny")
    assert code == 0 and "left out 1 file(s)" in err and "model.pt" in err
    pushed = run_json(embedded, capsys, "push", str(ft), "--base", "tiny", "--name", "ft",
                      "--method", "magnitude", "--keep", "0.1")  # fmt: skip
    assert pushed["report"]["left_out"] == ["pytorch_model.bin", "training_args.bin"]
    assert "pytorch_model.bin" not in pushed["report"]["sent"]
    listed = embedded.client.get(f"/v1/checkpoints/{pushed['checkpoint']['id']}/files").json()
    assert [f["path"] for f in listed["data"]] == [
        "config.json",
        "model.safetensors",
        "tokenizer/vocab.txt",
    ]
    code, _, err = run(embedded, capsys, "push", str(ft), "--base", "tiny", "--name", "ft",
                       "--method", "magnitude", "--keep", "0.1")  # fmt: skip
    assert "slim: warning: left out 2 file(s)" in err
    assert "pytorch_model.bin, training_args.bin" in err


def test_base_rm(embedded: Stack, models: Models, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(embedded, capsys, "base", "push", str(models.base), "--name", "tiny")[0] == 0
    assert run(embedded, capsys, "push", str(models.finetune), "--base", "tiny",
               "--name", "ft")[0] == 0  # fmt: skip
    code, _, err = run(embedded, capsys, "base", "rm", "tiny")
    assert code == 2 and err.startswith("slim: error [conflict]: base 'tiny' has 1 checkpoint")
    assert "delete those checkpoints first" in err
    assert run(embedded, capsys, "rm", "ft")[0] == 0
    code, out, _ = run(embedded, capsys, "base", "rm", "tiny")
    assert code == 0 and out.startswith("deleted base tiny (")
    assert embedded.client.get("/v1/bases").json()["count"] == 0
    code, _, err = run(embedded, capsys, "base", "rm", "tiny")
    assert code == 2 and "[not_found]" in err


# -- server verbs: one data directory -------------------------------------------------------------


def test_default_data_dir_does_not_depend_on_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLIM_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    seen = set()
    for where in (tmp_path, tmp_path / "elsewhere"):
        where.mkdir(exist_ok=True)
        monkeypatch.chdir(where)
        seen.add(Settings().resolved_database_url)
    assert seen == {f"sqlite:///{tmp_path / 'home/.local/share/slimstore/slim.db'}"}
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "slimstore"
    monkeypatch.setenv("SLIM_DATA_DIR", str(tmp_path / "mine"))
    assert Settings().data_dir == tmp_path / "mine"


def test_keys_never_create_a_database_and_say_which_they_touch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLIM_DATA_DIR", raising=False)
    data = tmp_path / "data"
    assert main(["keys", "create", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "[no_database]" in err and str(data.resolve() / "slim.db") in err
    assert "never creates one" in err and not data.exists()
    monkeypatch.setenv("SLIM_DATA_DIR", str(data))
    assert main(["migrate"]) == 0
    assert str(data / "slim.db") in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # anywhere: SLIM_DATA_DIR decides
    assert main(["keys", "create", "--role", "write"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("slim_")
    assert f"slim keys create: database sqlite:///{data.resolve() / 'slim.db'}" in out.err
    assert main(["keys", "list", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 1 and "slim keys list: database" in captured.err
    assert main(["gc", "--dry-run"]) == 0
    assert "slim gc: database sqlite:///" in capsys.readouterr().err


def test_make_run_takes_host_and_port() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def dry(*args: str, **env: str) -> str:
        out = subprocess.run(
            ["make", "-n", "-o", ".venv/.installed-stamp", "run", *args],
            cwd=REPO, capture_output=True, text=True, check=True,
            env={"PATH": "/usr/bin:/bin", **env},
        )  # fmt: skip
        return out.stdout.strip().splitlines()[-1]

    assert dry().endswith("slim serve --host 127.0.0.1 --port 8000")
    assert dry("HOST=0.0.0.0", "PORT=9000").endswith("slim serve --host 0.0.0.0 --port 9000")
    assert dry(HOST="laptop.local").endswith("--host 127.0.0.1 --port 8000")  # zsh's $HOST
    assert dry(SLIM_PORT="8123").endswith("--port 8123")


def test_push_sends_the_calibration_limit(
    embedded: Stack, models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(20)))
    assert run(embedded, capsys, "base", "push", str(models.base), "--name", "tiny")[0] == 0
    with pytest.raises(SystemExit) as bad:
        main(["push", str(models.finetune), "--base", "tiny", "--calibration-limit", "0"])
    assert bad.value.code == 2 and "must be ≥ 1" in capsys.readouterr().err
    pushed = run_json(embedded, capsys, "push", str(models.finetune), "--base", "tiny",
                      "--name", "ft", "--method", "magnitude", "--keep", "0.1",
                      "--calibration", str(calib), "--calibration-limit", "8")  # fmt: skip
    assert pushed["checkpoint"]["params"]["calibration_limit"] == 8
