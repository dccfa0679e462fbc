"""The Hub's read routes through the real app, by plain HTTP: what each answers, its headers
(``X-Repo-Commit``, ``ETag``/``X-Linked-*``, ``Link``), the Hub's error headers, and hostile
input. The real ``huggingface_hub`` and ``transformers`` are run against a live server in
``tests/client/test_hub_clients.py``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from tests.client.helpers import counter
from tests.conftest import Models, Stack
from tests.infra import commit_and_wait, make_base, push_dir


def _push(stack: Stack, base_id: str, directory: Path) -> dict:
    r = stack.client.post(
        "/v1/checkpoints", json={"name": "ft", "base_id": base_id, "method": "lossless"}
    )
    assert r.status_code == 201, r.text
    ckpt = r.json()
    push_dir(stack.client, "checkpoints", ckpt["id"], directory)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    info: dict = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    return info


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hub_error(r: httpx.Response, status: int, code: str | None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("x-error-code") == code, r.headers
    assert r.headers.get("x-error-message")
    if r.request.method != "HEAD":
        assert r.json()["error"]


def test_hub_routes_describe_and_serve_revisions(stack: Stack, models: Models) -> None:
    c = stack.client
    base = make_base(c, models.base)
    one = _push(stack, base["id"], models.finetune)
    two = _push(stack, base["id"], models.finetune2)
    weights = (models.finetune / "model.safetensors").read_bytes()
    weights2 = (models.finetune2 / "model.safetensors").read_bytes()

    # whoami: the key's namespace
    assert c.get("/api/whoami-v2").json()["name"] == "default"

    # model info: both spellings of the repo id, main and a pinned revision
    for repo in ("default/ft", "ft"):
        info = c.get(f"/api/models/{repo}").json()
        assert info["id"] == "default/ft" and info["sha"] == two["commit_id"]
        assert info["private"] is False and "xet" not in str(info).lower()
        sib = {s["rfilename"]: s for s in info["siblings"]}
        assert sib["model.safetensors"]["lfs"]["sha256"] == _sha(weights2)
        pinned = c.get(f"/api/models/{repo}/revision/{one['commit_id'][:9]}").json()
        assert pinned["sha"] == one["commit_id"]
        sib = {s["rfilename"]: s for s in pinned["siblings"]}
        assert sib["model.safetensors"]["lfs"]["sha256"] == _sha(weights)
        assert sib["model.safetensors"]["size"] == len(weights)

    # tree: root (folders, not recursive), recursive, a folder, a missing folder
    r = c.get("/api/models/default/ft/tree/main")
    assert r.headers["x-repo-commit"] == two["commit_id"]
    root = {e["path"]: e for e in r.json()}
    assert root["tokenizer"]["type"] == "directory"
    assert "tokenizer/vocab.txt" not in root
    st = root["model.safetensors"]
    assert st["lfs"] == {
        "oid": _sha(weights2),
        "size": len(weights2),
        "pointerSize": st["lfs"]["pointerSize"],
    }
    assert not any("xet" in k.lower() for e in r.json() for k in e)
    deep = {
        e["path"] for e in c.get("/api/models/ft/tree/main", params={"recursive": "true"}).json()
    }
    assert "tokenizer/vocab.txt" in deep and "tokenizer" in deep
    sub = c.get("/api/models/ft/tree/main/tokenizer").json()
    assert [e["path"] for e in sub] == ["tokenizer/vocab.txt"]
    _hub_error(c.get("/api/models/ft/tree/main/nothing"), 404, "EntryNotFound")

    # commits and refs
    commits = c.get("/api/models/default/ft/commits/main").json()
    assert [x["id"] for x in commits] == [two["commit_id"], one["commit_id"]]
    assert commits[0]["date"].endswith("Z") and commits[0]["authors"] == [{"user": "default"}]
    assert [x["id"] for x in c.get(f"/api/models/ft/commits/{one['commit_id']}").json()] == [
        one["commit_id"]
    ]
    refs = c.get("/api/models/ft/refs").json()
    assert refs["branches"] == [
        {"name": "main", "ref": "refs/heads/main", "targetCommit": two["commit_id"]}
    ]

    # resolve: HEAD headers, GET bytes at main and pinned, a Range, a base file as stored
    for url, data, commit in (
        ("/default/ft/resolve/main/model.safetensors", weights2, two["commit_id"]),
        (f"/ft/resolve/{one['commit_id']}/model.safetensors", weights, one["commit_id"]),
    ):
        h = c.head(url)
        assert h.status_code == 200
        assert h.headers["x-repo-commit"] == commit
        assert h.headers["etag"] == h.headers["x-linked-etag"] == f'"{_sha(data)}"'
        assert h.headers["x-linked-size"] == h.headers["content-length"] == str(len(data))
        assert not any(k.lower().startswith("x-xet") for k in h.headers)
        got = c.get(url)
        assert got.status_code == 200 and got.content == data
        part = c.get(url, headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == data[100:]
        assert part.headers["x-linked-size"] == str(len(data))
    vocab = (models.base / "tokenizer/vocab.txt").read_bytes()
    got = c.get(f"/default/{base['name']}/resolve/main/tokenizer/vocab.txt")
    assert got.content == vocab and got.headers["etag"] == f'"{_sha(vocab)}"'

    # a ref with a slash, sent as the clients send it (%2F), in every route that takes one
    from storage import revisions
    from storage.db import begin_write

    with stack.runtime.sessions() as session:
        begin_write(session)
        repo = revisions.get_repo(session, name="ft")
        revisions.move_ref(session, repo, "release/v1", one["commit_id"])
        session.commit()
    slashed = "release%2Fv1"
    assert c.get(f"/api/models/ft/revision/{slashed}").json()["sha"] == one["commit_id"]
    r = c.get(f"/default/ft/resolve/{slashed}/model.safetensors")
    assert r.headers["x-repo-commit"] == one["commit_id"] and r.content == weights
    r = c.get(f"/api/models/default/ft/tree/{slashed}/tokenizer")
    assert r.headers["x-repo-commit"] == one["commit_id"]
    assert [e["path"] for e in r.json()] == ["tokenizer/vocab.txt"]
    branches = {
        b["name"]: b["targetCommit"] for b in c.get("/api/models/ft/refs").json()["branches"]
    }
    assert branches == {"main": two["commit_id"], "release/v1": one["commit_id"]}

    # counted under the route templates like every other route
    route = "/{namespace}/{name}/resolve/{rev}/{path:path}"
    assert counter(c, "GET", route, 200) >= 3 and counter(c, "HEAD", route, 200) >= 1

    # errors in the Hub's shape
    _hub_error(c.get("/api/models/default/nope"), 404, "RepoNotFound")
    _hub_error(c.get("/api/models/ft/revision/deadbeef00"), 404, "RevisionNotFound")
    _hub_error(c.head("/ft/resolve/nope-branch/model.safetensors"), 404, "RevisionNotFound")
    missing = c.head("/default/ft/resolve/main/missing.bin")
    _hub_error(missing, 404, "EntryNotFound")
    assert missing.headers["x-repo-commit"] == two["commit_id"]
    _hub_error(c.get("/api/models/default/ft/commits/nope-branch"), 404, "RevisionNotFound")
    _hub_error(c.get("/api/models/nope/refs"), 404, "RepoNotFound")


def test_hub_routes_keep_namespaces_apart_and_refuse_hostile_input(
    embedded: Stack, models: Models
) -> None:
    c = embedded.client
    base = make_base(c, models.base)
    name = base["name"]
    other = embedded.client_for(embedded.new_key("other", "read"))
    # another namespace's repo: exactly like a missing one, by either spelling
    for url in (f"/api/models/default/{name}", f"/api/models/{name}"):
        _hub_error(other.get(url), 404, "RepoNotFound")
    _hub_error(other.head(f"/default/{name}/resolve/main/config.json"), 404, "RepoNotFound")
    # the answer for a repo that exists elsewhere is the one for a repo that exists nowhere
    exists = other.get(f"/api/models/default/{name}")
    nowhere = other.get("/api/models/default/zzzz")
    assert exists.json()["error"].replace(name, "zzzz") == nowhere.json()["error"]
    assert other.get("/api/whoami-v2").json()["name"] == "other"
    # no key / a bad key: 401 (a bad key says so the way the Hub does)
    anon = embedded.anonymous
    assert anon is not None
    assert anon.get(f"/api/models/{name}").status_code == 401
    bad = embedded.client_for("slim_nope_nope")
    r = bad.head(f"/{name}/resolve/main/config.json")
    assert r.status_code == 401
    assert r.headers["x-error-message"] == "Invalid credentials in Authorization header"

    # path traversal, a bad Range, odd revisions: 4xx in the Hub's shape, nothing served
    for path in ("..%2F..%2Fetc%2Fpasswd", "a/%2E%2E/%2E%2E/x", "%2Fetc%2Fpasswd", "a%00b"):
        r = c.get(f"/default/{name}/resolve/main/{path}")
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert r.headers.get("x-error-message"), path
    r = c.get(f"/api/models/{name}/tree/main/..%2F..")
    assert 400 <= r.status_code < 500 and r.headers.get("x-error-message")
    r = c.get(f"/{name}/resolve/main/config.json", headers={"Range": "bytes=999999999-"})
    assert r.status_code == 416 and r.headers["content-range"].startswith("bytes */")
    assert r.json()["error"]
    for rev in ("%2E%2E", "%2e%2e%2Fmain", "0" * 40, "x" * 300):
        r = c.get(f"/{name}/resolve/{rev}/config.json")
        assert r.status_code in (400, 404), (rev, r.status_code)
        assert r.headers.get("x-error-message"), rev
