"""The Hub's write routes through the real app, by plain HTTP: create a repository, preupload,
Git LFS (basic and multipart, signed URLs, verify), NDJSON commits, parent checks, what a
push becomes (stored whole, or exact against its base then compressed as a new revision), and
hostile input answered with the Hub's error shape with nothing stored. The real
``huggingface_hub`` and ``transformers`` push in ``tests/client/test_hub_clients.py``."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.conftest import Models, Stack, run_stack

MIB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def lfs_upload(c: httpx.Client, repo: str, data: bytes, *, verify: bool = True) -> str:
    """Upload ``data`` as the Hub's clients do (batch, PUT or parts + completion, verify)."""
    oid = _sha(data)
    r = c.post(
        f"/{repo}.git/info/lfs/objects/batch",
        json={
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": [{"oid": oid, "size": len(data)}],
            "hash_algo": "sha256",
        },
    )
    assert r.status_code == 200, r.text
    obj = r.json()["objects"][0]
    upload = obj["actions"]["upload"]
    anonymous = httpx.Client(base_url=str(c.base_url), timeout=120)  # no Authorization
    chunk = upload.get("header", {}).get("chunk_size")
    if chunk is None:
        assert anonymous.put(_path(upload["href"]), content=data).status_code == 200
    else:
        size = int(chunk)
        parts = sorted((k, v) for k, v in upload["header"].items() if k.isdigit())
        done = []
        for i, (number, url) in enumerate(parts):
            p = anonymous.put(_path(url), content=data[i * size : (i + 1) * size])
            assert p.status_code == 200, p.text
            done.append({"partNumber": int(number), "etag": p.headers["etag"]})
        r = anonymous.post(_path(upload["href"]), json={"oid": oid, "parts": done})
        assert r.status_code == 200, r.text
    if verify:
        r = c.post(_path(obj["actions"]["verify"]["href"]), json={"oid": oid, "size": len(data)})
        assert r.status_code == 200, r.text
    return oid


def ndjson(summary: str, ops: list[tuple[str, Any]], parent: str | None = None) -> bytes:
    header: dict[str, Any] = {"summary": summary, "description": ""}
    if parent is not None:
        header["parentCommit"] = parent
    lines = [{"key": "header", "value": header}]
    for kind, value in ops:
        lines.append({"key": kind, "value": value})
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def regular(path: str, data: bytes) -> tuple[str, Any]:
    return (
        "file",
        {"content": base64.b64encode(data).decode(), "path": path, "encoding": "base64"},
    )


def lfs(path: str, data: bytes) -> tuple[str, Any]:
    return ("lfsFile", {"path": path, "algo": "sha256", "oid": _sha(data), "size": len(data)})


def commit(c: httpx.Client, repo: str, body: bytes, rev: str = "main") -> httpx.Response:
    return c.post(
        f"/api/models/{repo}/commit/{rev}",
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
    )


def push_folder(c: httpx.Client, repo: str, folder: Path, extra: dict[str, bytes]) -> str:
    ops = []
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    for path, data in {**files, **extra}.items():
        if path.endswith(".safetensors"):
            lfs_upload(c, repo, data)
            ops.append(lfs(path, data))
        else:
            ops.append(regular(path, data))
    r = commit(c, repo, ndjson(f"push {repo}", ops))
    assert r.status_code == 200, r.text
    oid: str = r.json()["commitOid"]
    assert r.json()["commitUrl"].endswith(f"/commit/{oid}")
    return oid


def wait_jobs(c: httpx.Client, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = c.get("/v1/jobs", params={"limit": 100}).json()["data"]
        if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
            assert all(j["state"] == "succeeded" for j in jobs), jobs
            return
        time.sleep(0.1)
    raise AssertionError("jobs did not finish")


def read(c: httpx.Client, repo: str, rev: str, path: str) -> bytes:
    r = c.get(f"/{repo}/resolve/{rev}/{path}")
    assert r.status_code == 200, (path, r.text)
    assert r.headers["x-linked-etag"] == f'"{_sha(r.content)}"'
    return r.content


def hub_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("x-error-message")
    assert r.json()["error"]


def test_a_pushed_fine_tune_is_exact_at_once_then_compressed(stack: Stack, models: Models) -> None:
    c = stack.client
    assert c.post("/api/repos/create", json={"name": "tb"}).json()["url"].endswith("/default/tb")
    hub_error(c.post("/api/repos/create", json={"name": "tb"}), 409)
    base_commit = push_folder(c, "tb", models.base, {})
    info = c.get("/api/models/tb").json()
    assert info["sha"] == base_commit
    assert {s["rfilename"] for s in info["siblings"]} >= {".gitattributes", "model.safetensors"}
    # the first commit (.gitattributes only) is no base anything can be stored against
    assert [b["name"] for b in c.get("/v1/bases").json()["data"]] == ["tb@2"]
    assert c.get("/v1/stats").json()["num_bases"] == 1  # the same count everywhere

    # the fine-tune's repository compresses with magnitude (cheap, no calibration needed)
    r = c.post(
        "/v1/repos",
        json={"name": "ft", "policy": {"method": "magnitude", "keep": 0.05, "value_bits": 8}},
    )
    assert r.status_code == 201, r.text
    card = b"---\nbase_model: tb\n---\n# ft\n"
    ft_files = {
        p.relative_to(models.finetune).as_posix(): p.read_bytes()
        for p in models.finetune.rglob("*")
        if p.is_file()
    }
    exact = push_folder(c, "ft", models.finetune, {"README.md": card})
    # visible at once with exactly the pushed bytes (before any job ran or after)
    for path, data in ft_files.items():
        assert read(c, "default/ft", exact, path) == data
    wait_jobs(c)
    for path, data in ft_files.items():
        assert read(c, "ft", exact, path) == data  # now rebuilt from the exact delta
    commits = c.get("/api/models/ft/commits/main").json()
    assert commits[1]["id"] == exact and len(commits) == 3  # compressed, exact, initial
    assert (
        "magnitude" in commits[0]["title"] and f"Compressed from {exact}" in commits[0]["message"]
    )
    compressed = commits[0]["id"]
    assert c.get("/api/models/ft").json()["sha"] == compressed
    lossy = read(c, "ft", "main", "model.safetensors")
    assert lossy != ft_files["model.safetensors"] and len(lossy) == len(
        ft_files["model.safetensors"]
    )
    revs = c.get("/v1/repos/ft/revisions").json()["data"]
    page = c.get(f"/dashboard?checkpoint={revs[0]['checkpoint_id']}").text
    assert "2 without weights" in page  # the two first commits (.gitattributes)
    assert "History of" in page and compressed[:12] in page and exact[:12] in page
    assert revs[0]["commit_id"] == compressed and revs[0]["method"] == "magnitude"
    assert revs[1]["method"] == "lossless" and revs[2]["method"] == "whole"

    # preupload: the sha256 of what main serves, so unchanged files are skipped
    sample = base64.b64encode(lossy[:512]).decode()
    r = c.post(
        "/api/models/default/ft/preupload/main",
        json={"files": [
            {"path": "model.safetensors", "sample": sample, "size": len(lossy)},
            {"path": "notes.md", "sample": base64.b64encode(b"hi").decode(), "size": 2},
            {"path": "training_args.bin", "sample": "", "size": 10},
        ]},
    )  # fmt: skip
    modes = {f["path"]: f for f in r.json()["files"]}
    assert modes["model.safetensors"] == {
        "path": "model.safetensors", "uploadMode": "lfs", "shouldIgnore": False, "oid": _sha(lossy)
    }  # fmt: skip
    assert modes["notes.md"]["uploadMode"] == "regular"
    assert modes["training_args.bin"]["shouldIgnore"] is True  # pickles are left out
    assert r.json()["commitOid"] == compressed

    # a commit that keeps the weights (now only in a delta) and deletes a file: stored as the
    # same delta with the new small files, no job and no second compression
    jobs_before = c.get("/v1/jobs").json()["count"]
    r = commit(c, "ft", ndjson("drop vocab", [("deletedFolder", {"path": "tokenizer/"})]))
    assert r.status_code == 200, r.text
    later = r.json()["commitOid"]
    assert c.get("/v1/jobs").json()["count"] == jobs_before
    top = c.get("/v1/repos/ft/revisions").json()["data"][0]
    assert top["commit_id"] == later and top["method"] == "magnitude"
    assert top["stored_bytes"] <= revs[0]["stored_bytes"] + 1024
    files = c.get("/api/models/ft/revision/" + later).json()["siblings"]
    assert "tokenizer/vocab.txt" not in {s["rfilename"] for s in files}
    assert read(c, "ft", later, "model.safetensors") == lossy  # the bytes main served
    assert read(c, "ft", exact, "tokenizer/vocab.txt") == ft_files["tokenizer/vocab.txt"]
    wait_jobs(c)


def test_parent_commit_is_checked(embedded: Stack) -> None:
    c = embedded.client
    c.post("/api/repos/create", json={"name": "r"})
    head = c.get("/api/models/r").json()["sha"]
    one = commit(c, "r", ndjson("one", [regular("a.txt", b"1")], parent=head))
    assert one.status_code == 200, one.text
    two = commit(c, "r", ndjson("two", [regular("b.txt", b"2")], parent=head[:12]))
    hub_error(two, 412)
    assert "A commit has happened since" in two.json()["error"]
    files = {s["rfilename"] for s in c.get("/api/models/r").json()["siblings"]}
    assert files == {".gitattributes", "a.txt"}
    # without a parent, a commit lands on whatever main is
    assert commit(c, "r", ndjson("three", [regular("b.txt", b"2")])).status_code == 200


def test_multipart_uploads_and_signed_urls(tmp_path: Path) -> None:
    with run_stack("embedded", tmp_path, hub_part_bytes=5 * MIB) as s:
        c = s.client
        c.post("/api/repos/create", json={"name": "big"})
        data = bytes(range(256)) * (11 * MIB // 256 + 7)  # three parts
        lfs_upload(c, "big", data)
        r = commit(c, "big", ndjson("big", [lfs("blob.dat", data)]))
        assert r.status_code == 200, r.text
        got = c.get("/big/resolve/main/blob.dat", headers={"Range": "bytes=5242880-5242889"})
        assert got.status_code == 206 and got.content == data[5 * MIB : 5 * MIB + 10]

        # a URL signed for another object, size or key is refused; so is an expired one
        oid = _sha(b"payload")
        batch = c.post(
            "/big.git/info/lfs/objects/batch",
            json={"operation": "upload", "objects": [{"oid": oid, "size": 7}]},
        ).json()
        href = _path(batch["objects"][0]["actions"]["upload"]["href"])
        anon = s.anonymous
        assert anon is not None
        hub_error(anon.put(href.replace("size=7", "size=8"), content=b"payload!"), 403)
        hub_error(anon.put(href.replace("exp=", "exp=1"), content=b"payload"), 403)
        # bytes that do not hash to the oid, or more than the size: nothing stored
        hub_error(anon.put(href, content=b"PAYLOAD"), 400)
        assert anon.put(href, content=b"payload and more").status_code in (400, 413)
        r = c.post(f"/api/lfs/{oid}/verify", json={"oid": oid, "size": 7})
        hub_error(r, 422)
        assert anon.put(href, content=b"payload").status_code == 200
        assert c.post(f"/api/lfs/{oid}/verify", json={"oid": oid, "size": 7}).status_code == 200


def test_hostile_commits_store_nothing(embedded: Stack) -> None:
    c = embedded.client
    c.post("/api/repos/create", json={"name": "h"})
    head = c.get("/api/models/h").json()["sha"]
    bad = [
        (b"not json\n", 400),
        (b'{"key": "file", "value": {"path": "x", "content": "aGk="}}\n', 400),  # no header
        (ndjson("s", [("rename", {"path": "x"})]), 400),
        (ndjson("s", [regular("../escape", b"x")]), 400),
        (ndjson("s", [regular("/abs", b"x")]), 400),
        (ndjson("s", [("file", {"path": "x", "content": "!!!"})]), 400),
        (ndjson("s", [lfs("w.safetensors", b"never uploaded")]), 422),
        (ndjson("s", [("lfsFile", {"path": "w", "oid": "zz", "size": 1})]), 400),
        (ndjson("s", [("deletedFile", {"path": "missing.txt"})]), 404),
        (ndjson("s", [regular("model.bin", b"pickle")]), 415),
        (ndjson("s", [regular(f"f{i}.txt", b"x") for i in range(10_001)]), 400),
    ]
    for body, status in bad:
        hub_error(commit(c, "h", body), status)
    r = commit(c, "h", ndjson("s", [regular("a", b"x")]), rev="nobranch")
    hub_error(r, 404)
    assert r.headers["x-error-code"] == "RevisionNotFound"
    r = commit(c, "nothere", ndjson("s", [regular("a", b"x")]))
    hub_error(r, 404)
    assert r.headers["x-error-code"] == "RepoNotFound"
    r = c.post(
        "/api/models/h/commit/main?create_pr=1",
        content=ndjson("s", [regular("a", b"x")]),
        headers={"Content-Type": "application/x-ndjson"},
    )
    hub_error(r, 400)  # pull requests are not kept
    assert c.get("/api/models/h").json()["sha"] == head  # nothing of the above landed
    assert len(c.get("/api/models/h/commits/main").json()) == 1


def test_repo_creation_rules_and_keys(embedded: Stack) -> None:
    c = embedded.client
    hub_error(c.post("/api/repos/create", json={"name": "resolve"}), 400)
    hub_error(c.post("/api/repos/create", json={"name": "a--b"}), 400)
    hub_error(c.post("/api/repos/create", json={"name": "d", "type": "dataset"}), 400)
    hub_error(c.post("/api/repos/create", json={"name": "x", "organization": "other"}), 404)
    reader = embedded.client_for(embedded.new_key("default", "read"))
    hub_error(reader.post("/api/repos/create", json={"name": "mine"}), 403)
    c.post("/api/repos/create", json={"name": "mine"})
    hub_error(commit(reader, "mine", ndjson("s", [regular("a", b"x")])), 403)
    hub_error(
        reader.post(
            "/mine.git/info/lfs/objects/batch", json={"operation": "upload", "objects": []}
        ),
        403,
    )
    other = embedded.client_for(embedded.new_key("other", "write"))
    hub_error(commit(other, "default/mine", ndjson("s", [regular("a", b"x")])), 404)
    hub_error(other.get("/api/models/default/mine"), 404)
    r = c.get("/api/models/mine/xet-write-token/main")
    hub_error(r, 404)
    assert "HF_HUB_DISABLE_XET" in r.json()["error"]
    assert c.post("/api/validate-yaml", json={"content": "---\nlicense: mit\n---\n"}).json() == {
        "errors": [],
        "warnings": [],
    }
    assert c.post("/api/validate-yaml", json={"content": "---\n- x\n---\n"}).status_code == 400
    r = c.request("DELETE", "/api/repos/delete", json={"name": "mine"})
    assert r.status_code == 200
    hub_error(c.get("/api/models/mine"), 404)


def test_whole_repositories_dedup_their_blobs(embedded: Stack, models: Models) -> None:
    c = embedded.client
    c.post("/api/repos/create", json={"name": "w1"})
    c.post("/api/repos/create", json={"name": "w2"})
    push_folder(c, "w1", models.base, {})
    before = c.get("/v1/stats").json()
    push_folder(c, "w2", models.base, {})
    after = c.get("/v1/stats").json()
    assert (
        read(c, "w2", "main", "model.safetensors")
        == (models.base / "model.safetensors").read_bytes()
    )
    assert after["stored_bytes"] == before["stored_bytes"]  # the same blobs


def test_branches(embedded: Stack) -> None:
    c = embedded.client
    c.post("/api/repos/create", json={"name": "b"})
    first = c.get("/api/models/b").json()["sha"]
    assert c.post("/api/models/b/branch/dev", json={}).status_code == 200
    hub_error(c.post("/api/models/b/branch/dev", json={}), 409)
    r = commit(c, "b", ndjson("on dev", [regular("dev.txt", b"d")]), rev="dev")
    assert r.status_code == 200, r.text
    assert c.get("/api/models/b").json()["sha"] == first  # main did not move
    assert read(c, "b", "dev", "dev.txt") == b"d"
    refs = {x["name"] for x in c.get("/api/models/b/refs").json()["branches"]}
    assert refs == {"main", "dev"}
    assert c.delete("/api/models/b/branch/dev").status_code == 200
    hub_error(c.delete("/api/models/b/branch/main"), 400)
    hub_error(c.get("/b/resolve/dev/dev.txt"), 404)
    assert read(c, "b", r.json()["commitOid"], "dev.txt") == b"d"  # by commit id it stays


def test_paths_info_takes_a_read_key(embedded: Stack) -> None:
    c = embedded.client
    c.post("/api/repos/create", json={"name": "p"})
    assert commit(c, "p", ndjson("s", [regular("dir/a.txt", b"abc")])).status_code == 200
    reader = embedded.client_for(embedded.new_key("default", "read"))
    r = reader.post(
        "/api/models/default/p/paths-info/main",
        content="paths=dir%2Fa.txt&paths=dir&paths=missing&expand=false",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    got = {e["path"]: e for e in r.json()}
    assert set(got) == {"dir/a.txt", "dir"}
    assert got["dir/a.txt"]["lfs"]["oid"] == _sha(b"abc") and got["dir"]["type"] == "directory"
    r = reader.post("/api/models/p/paths-info/main", json={"paths": ["dir/a.txt"]})
    assert [e["path"] for e in r.json()] == ["dir/a.txt"]
    hub_error(reader.post("/api/models/p/paths-info/main", json={"paths": 3}), 422)
    hub_error(reader.post("/api/models/p/paths-info/nope", json={"paths": []}), 404)


def test_small_files_pushed_after_the_model_join_its_compression(
    tmp_path: Path, models: Models
) -> None:
    """transformers pushes the tokenizer after the model: the compression queued for the
    model's revision is handed to the newer one (same weights), so main ends compressed with
    every file — and the weights are compressed once."""
    from tests.conftest import start_worker

    with run_stack("embedded", tmp_path, workers=0) as s:
        c = s.client
        c.post("/api/repos/create", json={"name": "tb"})
        push_folder(c, "tb", models.base, {})
        policy = {"method": "magnitude", "keep": 0.05, "value_bits": 8}
        assert c.post("/v1/repos", json={"name": "ft", "base": "tb", "policy": policy}).is_success
        weights = (models.finetune / "model.safetensors").read_bytes()
        lfs_upload(c, "ft", weights)
        r = commit(c, "ft", ndjson("model", [lfs("model.safetensors", weights)]))
        model_commit = r.json()["commitOid"]
        r = commit(c, "ft", ndjson("tokenizer", [regular("tokenizer.json", b'{"v": 1}')]))
        tokenizer_commit = r.json()["commitOid"]
        assert read(c, "ft", "main", "tokenizer.json") == b'{"v": 1}'
        jobs = c.get("/v1/jobs").json()["data"]
        assert sorted(j["state"] for j in jobs) == ["queued"] * 3  # 2 exact, 1 compression
        with ExitStack() as stack:
            start_worker(stack, s.settings, tmp_path / "worker")
            wait_jobs(c)
        commits = c.get("/api/models/ft/commits/main").json()
        assert [x["id"] for x in commits[1:3]] == [tokenizer_commit, model_commit]
        assert f"Compressed from {tokenizer_commit}" in commits[0]["message"]
        assert read(c, "ft", "main", "tokenizer.json") == b'{"v": 1}'
        assert read(c, "ft", "main", "model.safetensors") != weights
        assert read(c, "ft", model_commit, "model.safetensors") == weights
