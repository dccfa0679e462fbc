"""The client verbs against a live embedded service (uvicorn in a thread; SQLite, local blobs,
worker thread) with small synthetic checkpoints: push, pull, resume both, ls/show/status/rm,
merge, errors. The real model runs in ``test_cli_real.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import client as sdk
from cli.main import main
from client import transfer
from client.files import BASE_MARKER
from core.files import sha256_file
from tests.client.helpers import CKPT_FILE_ROUTE, counter, settled_counter
from tests.conftest import Models, Stack
from tests.infra import TEST_ADMIN_KEY


def run(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str, key: str = TEST_ADMIN_KEY):
    """``slim ARGS`` in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([*args, "--url", stack.url, "--api-key", key])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = run(stack, capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def tree(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class Interrupt(Exception):
    """Stands for the user's Ctrl-C (or a dropped connection) in the middle of a transfer."""


class StopAfter:
    """A progress sink that interrupts the transfer once ``limit`` bytes went through."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.seen += nbytes
        if self.seen > self.limit:
            raise Interrupt

    def finish(self) -> None:
        pass


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfers in 16 kB pieces, so an interruption lands in the middle of a small file."""
    monkeypatch.setattr(transfer, "CHUNK_SIZE", 16 << 10)


@pytest.fixture
def ready(embedded: Stack, models: Models, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The synthetic base pushed, one fine-tune pushed and compressed (magnitude, keep 0.1)."""
    code, out, err = run(embedded, capsys, "base", "push", str(models.base), "--name", "tiny")
    assert code == 0, err
    assert out.startswith("base tiny (") and "ready" in out
    pushed = run_json(
        embedded, capsys, "push", str(models.finetune), "--base", "tiny", "--name", "ft",
        "--method", "magnitude", "--keep", "0.1", "--wait",
    )  # fmt: skip
    assert pushed["job"]["state"] == "succeeded", pushed
    assert pushed["checkpoint"]["state"] == "ready"
    return pushed


def test_push_ls_show_status_pull_rm(
    embedded: Stack, models: Models, ready: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ckpt = ready["checkpoint"]
    assert ready["report"]["sent"] == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]

    listed = run_json(embedded, capsys, "ls", "--base", "tiny")
    assert [c["name"] for c in listed] == ["ft"] and listed[0]["ratio"] > 1
    code, out, _ = run(embedded, capsys, "ls")
    assert code == 0 and out.splitlines()[0].split()[:4] == ["ID", "NAME", "BASE", "ENCODING"]
    assert ckpt["id"][:8] in out and " tiny " in out and "ready" in out

    code, out, _ = run(embedded, capsys, "show", "ft")
    assert code == 0 and "method: magnitude" in out and "ratio:" in out
    assert run_json(embedded, capsys, "show", ckpt["id"][:8])["id"] == ckpt["id"]

    status = run_json(embedded, capsys, "status", "ft")  # a checkpoint's name: its latest job
    assert status["id"] == ready["job"]["id"] and status["state"] == "succeeded"
    code, out, _ = run(embedded, capsys, "status", ready["job"]["id"], "--follow")
    assert code == 0 and "succeeded" in out

    code, out, err = run(embedded, capsys, "pull", "ft", str(tmp_path / "pulled"))
    assert code == 0, err
    assert out.startswith(f"pulled ft into {tmp_path / 'pulled'}: 3 file(s)")
    pulled = tree(tmp_path / "pulled")
    files = {
        f["path"]: f
        for f in embedded.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["data"]
    }
    assert pulled == {p: f["recon_sha256"] or f["sha256"] for p, f in files.items()}
    assert pulled["config.json"] == sha256_file(models.finetune / "config.json")

    code, out, _ = run(embedded, capsys, "pull", "ft", str(tmp_path / "pulled"))
    assert code == 0 and "3 already there" in out  # verified, nothing fetched

    stats = run_json(embedded, capsys, "stats")
    assert stats["num_checkpoints"] == 1 and stats["num_bases"] == 1

    code, out, _ = run(embedded, capsys, "rm", "ft")
    assert code == 0 and out.startswith("deleted checkpoint ft")
    code, _, err = run(embedded, capsys, "show", "ft")
    assert code == 2 and err.startswith("slim: error [not_found]: no checkpoint named")


def test_pull_local_is_byte_identical_and_caches_the_base(
    embedded: Stack, ready: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    code, _, err = run(embedded, capsys, "pull", "ft", str(tmp_path / "server"))
    assert code == 0, err
    code, out, err = run(
        embedded,
        capsys,
        "pull",
        "ft",
        str(tmp_path / "local"),
        "--local",
        "--cache-dir",
        str(cache),
    )
    assert code == 0, err
    assert "rebuilt ft locally" in out and "base" in out and "downloaded" in out
    assert tree(tmp_path / "local") == tree(tmp_path / "server")
    base = embedded.client.get(f"/v1/bases/{ready['checkpoint']['base_id']}").json()
    assert (cache / "bases" / base["manifest_sha256"] / BASE_MARKER).is_file()

    again = run_json(
        embedded,
        capsys,
        "pull",
        "ft",
        str(tmp_path / "again"),
        "--local",
        "--cache-dir",
        str(cache),
    )
    assert again["base_bytes"] == 0 and again["delta_bytes"] == 0  # both from the cache
    assert tree(tmp_path / "again") == tree(tmp_path / "server")

    half = run_json(
        embedded, capsys, "pull", "ft", str(tmp_path / "half"), "--scale", "0.5", "--local",
        "--cache-dir", str(cache),
    )  # fmt: skip
    run(embedded, capsys, "pull", "ft", str(tmp_path / "half-srv"), "--scale", "0.5")
    assert half["local"] and tree(tmp_path / "half") == tree(tmp_path / "half-srv")


def test_interrupted_push_resends_only_what_is_missing(
    embedded: Stack, models: Models, capsys: pytest.CaptureFixture[str]
) -> None:
    client = sdk.SlimClient(embedded.url, TEST_ADMIN_KEY)
    client.push_base(models.base, "tiny")
    before = counter(embedded.client, "PUT", CKPT_FILE_ROUTE, 200)
    # Files go in path order: config.json (small) is stored, model.safetensors is cut mid-body.
    with pytest.raises(Interrupt):
        client.push(models.finetune, "tiny", name="ft", method="magnitude", keep=0.1,
                    progress=StopAfter(64 << 10))  # fmt: skip
    stored = embedded.client.get("/v1/checkpoints").json()["data"][0]
    listed = embedded.client.get(f"/v1/checkpoints/{stored['id']}/files").json()["data"]
    assert [f["path"] for f in listed] == ["config.json"] and stored["state"] == "uploading"

    # Other options do not resume it: they are refused, naming what differs.
    code, _, err = run(embedded, capsys, "push", str(models.finetune), "--base", "tiny",
                       "--name", "ft", "--method", "lossless")  # fmt: skip
    assert code == 2 and err.startswith("slim: error [options_differ]")
    assert "method: asked lossless, stored magnitude" in err
    same = ("--base", "tiny", "--name", "ft", "--method", "magnitude", "--keep", "0.1")
    code, out, err = run(embedded, capsys, "push", str(models.finetune), *same, "--wait")
    assert code == 0, err
    assert "2 file(s) sent" in out and "1 already stored" in out and "ft ready" in out
    assert "(method magnitude)" in out and "loss is not measured" in err
    # Every file went through exactly once (the cut upload was refused, nothing kept).
    assert settled_counter(embedded.client, "PUT", CKPT_FILE_ROUTE, 200, before + 3) == before + 3
    assert client.get_checkpoint("ft").method == "magnitude"

    code, out, _ = run(embedded, capsys, "push", str(models.finetune), *same)
    assert code == 0 and "0 file(s) sent" in out  # the same files: the existing checkpoint
    # Other files once it is ready: the name's next revision, not a refusal.
    code, out, err = run(embedded, capsys, "push", str(models.finetune2), *same)
    assert code == 0 and "3 file(s) sent" in out and "slim log ft" in out, err
    names = [c["name"] for c in embedded.client.get("/v1/checkpoints").json()["data"]]
    assert names == ["ft", "ft"]
    client.close()


def test_interrupted_pull_resumes_with_range(
    embedded: Stack, ready: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "pulled"
    client = sdk.SlimClient(embedded.url, TEST_ADMIN_KEY)
    with pytest.raises(Interrupt):  # cut in model.safetensors (small files read beside it)
        client.pull("ft", out_dir, progress=StopAfter(100 << 10))
    part = out_dir / "model.safetensors.incomplete"
    assert part.is_file() and not (out_dir / "model.safetensors").exists()
    kept = part.stat().st_size
    assert kept > 0
    small = ("config.json", "tokenizer/vocab.txt")
    done = {rel for rel in small if (out_dir / rel).is_file()}
    (out_dir / "config.json").write_text("{}")  # a wrong complete file is replaced
    done.discard("config.json")

    ranged = counter(embedded.client, "GET", CKPT_FILE_ROUTE, 206)
    report = run_json(embedded, capsys, "pull", "ft", str(out_dir))
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path["model.safetensors"]["resumed_from"] == kept
    for rel in small:  # done before the cut: verified and kept; else fetched (or resumed)
        assert by_path[rel]["skipped"] == (rel in done)
    assert settled_counter(embedded.client, "GET", CKPT_FILE_ROUTE, 206, ranged + 1) == ranged + 1
    assert not part.exists()

    reference = tmp_path / "reference"
    client.pull("ft", reference)
    assert tree(out_dir) == tree(reference)

    # A stale partial file (wrong bytes) is detected by its hash and fetched whole again.
    (out_dir / "model.safetensors").unlink()
    part.write_bytes(b"\0" * 1000)
    again = client.pull("ft", out_dir)
    assert tree(out_dir) == tree(reference)
    assert [f.resumed_from for f in again.files if f.path == "model.safetensors"] == [0]
    client.close()


def test_merge_and_follow(
    embedded: Stack, models: Models, ready: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, _, err = run(embedded, capsys, "push", str(models.finetune2), "--base", "tiny",
                       "--name", "ft2", "--method", "magnitude", "--keep", "0.1", "--wait")  # fmt: skip
    assert code == 0, err
    code, out, err = run(embedded, capsys, "merge", "ft", "ft2", "--name", "heads",
                         "--method", "ties", "--wait")  # fmt: skip
    assert code == 2 and "heads_from" in err  # their classifier heads differ: never averaged
    code, out, err = run(embedded, capsys, "merge", "ft", "ft2", "--name", "both",
                         "--method", "ties", "--heads-from", "ft2", "--wait")  # fmt: skip
    assert code == 0, err
    assert "both ready" in out
    shown = run_json(embedded, capsys, "show", "both")
    assert shown["method"] == "merge" and shown["derived_from"]["method"] == "ties"
    assert shown["derived_from"]["heads_from"] == "ft2"
    code, out, err = run(embedded, capsys, "pull", "both", str(tmp_path / "merged"))
    assert code == 0, err


def test_keys_and_roles(
    embedded: Stack, ready: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    reader = embedded.new_key(role="read")
    code, out, _ = run(embedded, capsys, "ls", key=reader)
    assert code == 0 and "ft" in out
    code, _, err = run(embedded, capsys, "rm", "ft", key=reader)
    assert code == 2 and err.startswith("slim: error [forbidden]")
    code, _, err = run(embedded, capsys, "ls", key="slim_nope_000000000000000000")
    assert code == 2 and err.startswith("slim: error [unauthorized]")
    other = embedded.new_key(namespace="team-b", role="write")
    code, out, _ = run(embedded, capsys, "ls", key=other)
    assert code == 0 and out.strip() == "(none)"  # another namespace sees nothing


def test_serve_limits_malloc_arenas_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`slim serve` caps glibc's malloc arenas (freed download pieces are not kept once per
    thread); an operator's MALLOC_ARENA_MAX wins."""
    import platform

    from cli.server import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas(2) is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False


def test_second_push_is_a_revision_log_and_pull_by_revision(
    embedded: Stack, models: Models, ready: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    one = ready["checkpoint"]
    assert one["revision"] == 1 and len(one["commit_id"]) == 40
    # The same files and options again: a no-op that names the revision.
    code, out, err = run(
        embedded, capsys, "push", str(models.finetune), "--base", "tiny", "--name", "ft",
        "--method", "magnitude", "--keep", "0.1",
    )  # fmt: skip
    assert code == 0, err
    assert f"revision 1 of ft: commit {one['commit_id']}" in out and "0 file(s) sent" in out
    assert "ft ready:" in out and "follow it with" not in out  # nothing left to follow
    # Other files: revision 2, its parent revision 1; the name now means revision 2.
    code, out, err = run(
        embedded, capsys, "push", str(models.finetune2), "--base", "tiny", "--name", "ft",
        "--method", "magnitude", "--keep", "0.1", "--wait",
    )  # fmt: skip
    assert code == 0, err
    two = run_json(embedded, capsys, "show", "ft")
    assert two["revision"] == 2 and two["parent_commit"] == one["commit_id"]
    assert f"revision 2 of ft: commit {two['commit_id']}" in out

    code, out, _ = run(embedded, capsys, "log", "ft")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["REV", "COMMIT", "TIME"]
    assert lines[1].split()[:2] == ["2", two["commit_id"][:12]] and "main" in lines[1]
    assert lines[2].split()[:2] == ["1", one["commit_id"][:12]]
    code, out, _ = run(embedded, capsys, "show", "ft", "--revision", one["commit_id"][:7])
    assert code == 0 and f"revision: 1 (commit {one['commit_id']})" in out

    for rev, directory, want in ((one["commit_id"][:10], "r1", one), ("main", "r2", two)):
        code, _, err = run(embedded, capsys, "pull", "ft", str(tmp_path / directory),
                           "--revision", rev)  # fmt: skip
        assert code == 0, err
        files = embedded.client.get(f"/v1/checkpoints/{want['id']}/files").json()["data"]
        assert tree(tmp_path / directory) == {f["path"]: f["recon_sha256"] for f in files}
    assert tree(tmp_path / "r1") != tree(tmp_path / "r2")
    code, _, err = run(embedded, capsys, "pull", "ft", str(tmp_path / "x"), "--revision", "0" * 7)
    assert code == 2 and "revision_not_found" in err


def test_a_closed_pipe_ends_the_listing_quietly() -> None:
    """``slim log NAME | head``: the reader leaves early; no traceback, exit status 0."""
    import subprocess
    import sys

    code = (
        "import argparse, cli.main as m\n"
        "def handler(args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "class Parser:\n"
        "    def parse_args(self, argv):\n"
        "        return argparse.Namespace(handler=handler)\n"
        "m.build_parser = Parser\n"
        "raise SystemExit(m.main([]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
