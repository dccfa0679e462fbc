"""The Hugging Face Hub's own clients against a live Slimstore: ``huggingface_hub`` and
``transformers``, unchanged, in fresh processes with ``HF_ENDPOINT`` / ``HF_TOKEN`` pointing at
the server and an empty ``HF_HOME`` — downloads byte-identical to ``slim pull``, a revision
pinned by commit, a resumed download, the listings, and the Hub's errors raised as the Hub's
exception classes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from service import hub
from tests.client.helpers import REPO, slim
from tests.conftest import Models, Stack
from tests.infra import TEST_ADMIN_KEY, commit_and_wait, make_base, push_dir


def hub_python(stack: Stack, home: Path, code: str, key: str = TEST_ADMIN_KEY) -> Any:
    """Run ``code`` in a new Python process set up as a Hub user pointed at ``stack``; returns
    the JSON the code printed last (it must ``print(json.dumps(...))``)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
    }
    env |= {
        "HF_ENDPOINT": stack.url,
        "HF_TOKEN": key,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",  # uploads through Git LFS (docs/hub.md)
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(REPO),
    }
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def push(stack: Stack, base_id: str, directory: Path, name: str, method: str = "lossless") -> dict:
    r = stack.client.post(
        "/v1/checkpoints", json={"name": name, "base_id": base_id, "method": method}
    )
    assert r.status_code == 201, r.text
    ckpt = r.json()
    push_dir(stack.client, "checkpoints", ckpt["id"], directory)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    info: dict = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    return info


def digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


def test_huggingface_hub_reads_slimstore(
    embedded: Stack, models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "PAGE_SIZE", 1)  # every listing takes several Link-ed pages
    c = embedded.client
    base = make_base(c, models.base, name="tiny-base")
    one = push(embedded, base["id"], models.finetune, "ft")
    two = push(embedded, base["id"], models.finetune2, "ft")
    pulled = tmp_path / "pulled"
    env = {**os.environ, "SLIM_URL": embedded.url, "SLIM_API_KEY": TEST_ADMIN_KEY}
    r = slim("pull", "ft", str(pulled), env=env)
    assert r.returncode == 0, r.stderr
    other_key = embedded.new_key("other", "read")

    got = hub_python(
        embedded,
        tmp_path / "hf",
        f"""
        import json, huggingface_hub as hh
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
        api = HfApi()
        out = {{"version": hh.__version__}}
        out["base"] = snapshot_download("default/tiny-base")
        out["ft"] = snapshot_download("ft")
        out["pinned"] = hf_hub_download(
            "default/ft", "model.safetensors", revision="{one["commit_id"]}")
        info = api.model_info("default/ft")
        out["info"] = [info.id, info.sha, sorted(s.rfilename for s in info.siblings)]
        out["info_pinned"] = api.model_info("ft", revision="{one["commit_id"][:8]}").sha
        out["files"] = api.list_repo_files("default/ft")
        out["tree"] = [
            [e.path, getattr(e, "size", None), e.lfs.sha256 if getattr(e, "lfs", None) else None]
            for e in api.list_repo_tree("default/ft", recursive=True)
        ]
        out["commits"] = [[x.commit_id, x.title] for x in api.list_repo_commits("default/ft")]
        out["refs"] = [[b.name, b.target_commit] for b in api.list_repo_refs("ft").branches]
        meta = api.get_safetensors_metadata("default/ft")
        st = meta.files_metadata["model.safetensors"]
        out["st"] = sorted((k, v.dtype, v.shape) for k, v in st.tensors.items())
        out["whoami"] = api.whoami()["name"]
        out["exists"] = [api.file_exists("ft", "config.json"), api.file_exists("ft", "nope.json")]
        errors = {{}}
        for label, call in [
            ("repo", lambda: hf_hub_download("default/nope", "config.json")),
            ("revision", lambda: hf_hub_download("ft", "config.json", revision="no-such-ref")),
            ("entry", lambda: hf_hub_download("ft", "nope.json")),
            ("other", lambda: HfApi(token="{other_key}").model_info("default/ft")),
            ("other_file", lambda: hf_hub_download("default/ft", "config.json",
                                                   token="{other_key}", cache_dir="other")),
            ("info_revision", lambda: api.model_info("ft", revision="0000000")),
            ("snapshot_revision", lambda: snapshot_download("ft", revision="nope")),
        ]:
            try:
                call()
                errors[label] = None
            except Exception as exc:
                errors[label] = type(exc).__name__
        out["errors"] = errors
        print(json.dumps(out))
        """,
    )
    assert got["version"].startswith("2.")
    assert digests(Path(got["base"])) == digests(models.base)
    assert digests(Path(got["ft"])) == digests(pulled) == digests(models.finetune2)
    assert Path(got["ft"]).name == two["commit_id"]  # the snapshot folder is the commit
    pinned = Path(got["pinned"]).read_bytes()
    assert pinned == (models.finetune / "model.safetensors").read_bytes()
    assert got["info"][:2] == ["default/ft", two["commit_id"]]
    assert got["info"][2] == sorted(digests(models.finetune2))
    assert got["info_pinned"] == one["commit_id"]
    assert sorted(got["files"]) == sorted(digests(models.finetune2))
    tree = {p: (size, sha) for p, size, sha in got["tree"]}
    for rel, sha in digests(models.finetune2).items():
        assert tree[rel] == ((models.finetune2 / rel).stat().st_size, sha)
    assert got["commits"][0][0] == two["commit_id"] and got["commits"][1][0] == one["commit_id"]
    assert got["refs"] == [["main", two["commit_id"]]]
    from safetensors import safe_open

    with safe_open(str(models.finetune2 / "model.safetensors"), "np") as f:
        want = sorted(
            [k, str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())]
            for k in f.keys()  # noqa: SIM118 - safe_open is not a mapping
        )
    assert [[k, d, s] for k, d, s in got["st"]] == want
    assert got["whoami"] == "default"
    assert got["exists"] == [True, False]
    assert got["errors"] == {
        "repo": "RepositoryNotFoundError",
        "revision": "RevisionNotFoundError",
        "entry": "RemoteEntryNotFoundError",
        "other": "RepositoryNotFoundError",
        "other_file": "RepositoryNotFoundError",
        "info_revision": "RevisionNotFoundError",
        "snapshot_revision": "RevisionNotFoundError",
    }


def test_huggingface_hub_resumes_a_broken_download(
    embedded: Stack, models: Models, tmp_path: Path
) -> None:
    """``http_get`` with ``resume_size`` (what ``huggingface_hub`` does after a broken stream)
    sends ``Range`` and gets the rest of the rebuilt file."""
    base = make_base(embedded.client, models.base)
    push(embedded, base["id"], models.finetune, "ft")
    whole = (models.finetune / "model.safetensors").read_bytes()
    half = len(whole) // 2
    part = tmp_path / "part.safetensors"
    part.write_bytes(whole[:half])
    got = hub_python(
        embedded,
        tmp_path / "hf",
        f"""
        import json
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import get_hf_file_metadata, http_get
        from huggingface_hub.utils import build_hf_headers
        url = hf_hub_url("default/ft", "model.safetensors")
        meta = get_hf_file_metadata(url)
        with open({str(part)!r}, "ab") as f:
            http_get(url, f, resume_size={half}, headers=build_hf_headers(),
                     expected_size=meta.size)
        print(json.dumps([meta.etag, meta.size, meta.commit_hash]))
        """,
    )
    assert part.read_bytes() == whole
    assert got[0] == hashlib.sha256(whole).hexdigest() and got[1] == len(whole)


@pytest.mark.slow
def test_transformers_from_pretrained_by_revision(embedded: Stack, tmp_path: Path) -> None:
    """The real MiniLM base and its tiny fine-tune: ``from_pretrained("name", revision=...)``
    loads the checkpoint rebuilt by Slimstore and predicts exactly what the original does."""
    from tests.fixtures import base_dir, test_examples, tiny_finetune_dir

    ft_dir = tiny_finetune_dir()
    base = make_base(embedded.client, base_dir(), name="all-MiniLM-L6-v2")
    ckpt = push(embedded, base["id"], ft_dir, "rotten-tomatoes", method="lossless")
    texts = [e.text for e in test_examples(16)]
    code = f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        texts = {texts!r}
        def predict(source, **kw):
            tok = AutoTokenizer.from_pretrained(source, **kw)
            model = AutoModelForSequenceClassification.from_pretrained(source, **kw).eval()
            with torch.no_grad():
                logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
            return logits.tolist()
        print(json.dumps([
            predict("rotten-tomatoes", revision="{ckpt["commit_id"]}"),
            predict("default/rotten-tomatoes"),
            predict({str(ft_dir)!r}),
        ]))
        """
    pinned, main, original = hub_python(embedded, tmp_path / "hf", code)
    assert pinned == main == original


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "distributed"])
def test_push_to_hub_then_from_pretrained(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A user with only the Hub's clients: ``create_repo`` + ``upload_folder`` of a base,
    ``push_to_hub`` of a fine-tune whose card names it, then ``from_pretrained`` of the exact
    revision at once and of the compressed one (auto at 0.99 on the pushed calibration file)
    once it lands — predictions compared with the original; a pinned ``hf_hub_download``,
    ``list_repo_commits`` showing the compression, ``get_safetensors_metadata``, and two
    concurrent ``create_commit``s on one parent (one gets 412)."""
    from tests.client.helpers import tiny_bert, write_calibration
    from tests.fixtures import test_examples

    stack: Stack = request.getfixturevalue(kind)
    base_dir, (ft_dir,) = tiny_bert(tmp_path / "models", n_finetunes=1)
    calib = write_calibration(tmp_path / "calibration.jsonl", n=64)
    texts = [e.text for e in test_examples(16)]
    code = f"""
        import json, threading, torch, huggingface_hub as hh, transformers
        from huggingface_hub import HfApi, CommitOperationAdd, hf_hub_download, snapshot_download
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        api = HfApi()
        out = {{"versions": [hh.__version__, transformers.__version__]}}
        texts = {texts!r}
        def predict(source, **kw):
            tok = AutoTokenizer.from_pretrained(source, **kw)
            model = AutoModelForSequenceClassification.from_pretrained(source, **kw).eval()
            with torch.no_grad():
                return model(**tok(texts, padding=True, return_tensors="pt")).logits.tolist()
        api.create_repo("tiny-base")
        api.upload_folder(repo_id="tiny-base", folder_path={str(base_dir)!r})
        api.create_repo("sentiment")
        api.upload_file(path_or_fileobj=b"---\\nbase_model: tiny-base\\n---\\n# sentiment\\n",
                        path_in_repo="README.md", repo_id="sentiment")
        api.upload_file(path_or_fileobj={str(calib)!r}, path_in_repo="calibration.jsonl",
                        repo_id="sentiment")
        model = AutoModelForSequenceClassification.from_pretrained({str(ft_dir)!r})
        AutoTokenizer.from_pretrained({str(ft_dir)!r}).push_to_hub("sentiment")
        info = model.push_to_hub("sentiment", commit_message="fine-tune")
        out["exact"] = info.oid
        out["original"] = predict({str(ft_dir)!r})
        out["exact_predictions"] = predict("sentiment", revision=info.oid)
        out["pinned"] = hf_hub_download("default/sentiment", "model.safetensors",
                                        revision=info.oid)
        api.create_repo("scratch")
        head = api.model_info("scratch").sha
        results = []
        def race(i):
            try:
                api.create_commit("scratch", operations=[CommitOperationAdd(
                    f"note{{i}}.txt", f"{{i}}".encode())], commit_message=f"race {{i}}",
                    parent_commit=head)
                results.append("ok")
            except hh.errors.HfHubHTTPError as e:
                results.append(e.response.status_code)
        threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
        [t.start() for t in threads]; [t.join() for t in threads]
        out["race"] = sorted(map(str, results))
        print(json.dumps(out))
        """
    got = hub_python(stack, tmp_path / "hf", code)
    assert got["exact_predictions"] == got["original"]
    pushed = (ft_dir / "model.safetensors").read_bytes()
    assert Path(got["pinned"]).read_bytes() == pushed
    assert got["race"] == ["412", "ok"]
    # the compression lands as a new revision on main (a job; wait for it)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        revs = stack.client.get("/v1/repos/sentiment/revisions").json()["data"]
        if revs[0]["message"].startswith("sentiment: auto"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no compressed revision: {revs}")
    assert revs[0]["fidelity"] >= 0.99 and revs[0]["refs"] == ["main"]
    code = f"""
        import json, torch
        from huggingface_hub import HfApi
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        api = HfApi()
        texts = {texts!r}
        model = AutoModelForSequenceClassification.from_pretrained("sentiment").eval()
        tok = AutoTokenizer.from_pretrained("sentiment")
        with torch.no_grad():
            logits = model(**tok(texts, padding=True, return_tensors="pt")).logits.tolist()
        meta = api.get_safetensors_metadata("sentiment").files_metadata["model.safetensors"]
        print(json.dumps({{
            "compressed": logits,
            "commits": [c.title for c in api.list_repo_commits("sentiment")],
            "tensors": len(meta.tensors),
            "paths": [p.path for p in api.get_paths_info("sentiment", ["config.json", "nope"])],
        }}))
        """
    later = hub_python(stack, tmp_path / "hf2", code)
    agree = sum(
        max(range(2), key=a.__getitem__) == max(range(2), key=b.__getitem__)
        for a, b in zip(later["compressed"], got["original"], strict=True)
    )
    assert agree >= 15, agree
    assert later["commits"][0].startswith("sentiment: auto") and "fine-tune" in later["commits"]
    assert later["tensors"] > 10
    assert later["paths"] == ["config.json"]
