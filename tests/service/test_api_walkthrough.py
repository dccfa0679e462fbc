"""``docs/api.md``'s curl walkthrough runs as written, so the page cannot drift from the API.

The ``sh`` block(s) of its "Push, then pull" section are run by bash (``-euo pipefail``) with
curl and jq against a live embedded service, from a directory holding ``base/`` and ``ft/``,
with ``SLIM_URL`` and ``SLIM_API_KEY`` (a write key made for the test) set as a user would.
Where jq is not installed, a stand-in that understands the one form the page uses
(``jq -r .field``) is put on PATH first.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.helpers import REPO
from tests.conftest import Models, Stack

API_MD = REPO / "docs" / "api.md"
SECTION = "## Push, then pull"

_JQ_STANDIN = """\
import json, sys
args = [a for a in sys.argv[1:] if a != "-r"]
if len(args) != 1 or not args[0].startswith("."):
    sys.exit(f"jq stand-in: only 'jq -r .field' is supported, not {sys.argv[1:]}")
value = json.load(sys.stdin)
for part in filter(None, args[0].split(".")):
    value = value[part]
print(value if isinstance(value, str) else json.dumps(value))
"""


def walkthrough_blocks(markdown: str) -> list[str]:
    """The ```sh blocks of the "Push, then pull" section, in order."""
    start = markdown.index(SECTION)
    end = markdown.find("\n## ", start + len(SECTION))
    section = markdown[start : end if end != -1 else None]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def _tools(bin_dir: Path) -> dict[str, str]:
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.fail("the walkthrough needs bash and curl")
    env = {**os.environ}
    if shutil.which("jq") is None:
        bin_dir.mkdir()
        jq = bin_dir / "jq"
        jq.write_text(f"#!{sys.executable}\n{_JQ_STANDIN}")
        jq.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_the_walkthrough_has_a_block_that_sends_the_key_and_sets_job() -> None:
    blocks = walkthrough_blocks(API_MD.read_text())
    assert blocks, "docs/api.md lost its walkthrough"
    script = "\n".join(blocks)
    assert "Authorization: Bearer $SLIM_API_KEY" in script
    assert re.search(r"^JOB=\$\(", script, flags=re.MULTILINE)
    for line in script.splitlines():
        if line.lstrip().startswith("curl") or "$(curl" in line:
            assert '-H "$AUTH"' in line, f"a curl line without the key: {line}"


def test_the_walkthrough_runs_as_written(embedded: Stack, models: Models, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(models.base, work / "base")
    shutil.copytree(models.finetune, work / "ft")
    env = _tools(tmp_path / "bin")
    env |= {"SLIM_URL": embedded.url, "SLIM_API_KEY": embedded.new_key("default", "write")}
    script = "\n".join(walkthrough_blocks(API_MD.read_text()))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    assert "ready" in out.splitlines()
    assert re.search(r"^job [0-9a-f-]{36}: succeeded$", out, flags=re.MULTILINE), out
    assert "resumed" in out.splitlines()
    # What the walkthrough pulled is the checkpoint the service holds, by its recorded hash.
    ckpt = embedded.client.get("/v1/checkpoints/sst2").json()
    assert ckpt["state"] == "ready" and ckpt["method"] == "magnitude"
    files = {f["path"]: f for f in embedded.client.get("/v1/checkpoints/sst2/files").json()["data"]}
    assert set(files) == {
        p.relative_to(work / "ft").as_posix() for p in (work / "ft").rglob("*") if p.is_file()
    }
    pulled = hashlib.sha256((work / "model.safetensors").read_bytes()).hexdigest()
    assert pulled == files["model.safetensors"]["recon_sha256"]
    head = re.search(r"(?im)^etag: \"([0-9a-f]{64})\"", out)
    assert head is not None and head.group(1) == pulled, out
