"""A name's history through the real app: a second push of a name is its revision 2, the name
means main, and a pull by revision gives exactly that revision's bytes."""

from __future__ import annotations

import hashlib

from tests.conftest import Models, Stack
from tests.infra import commit_and_wait, make_base, push_dir


def push(stack: Stack, base_id: str, directory: object, **body: object) -> dict:
    r = stack.client.post(
        "/v1/checkpoints", json={"name": "ft", "base_id": base_id, "method": "lossless", **body}
    )
    assert r.status_code == 201, r.text
    ckpt = r.json()
    push_dir(stack.client, "checkpoints", ckpt["id"], directory)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    info: dict = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    return info


def test_second_push_is_revision_2_and_revision_1_stays_pullable(
    embedded: Stack, models: Models
) -> None:
    c = embedded.client
    base = make_base(c, models.base)
    one = push(embedded, base["id"], models.finetune)
    two = push(embedded, base["id"], models.finetune2)
    assert (one["revision"], two["revision"]) == (1, 2)
    assert two["parent_commit"] == one["commit_id"] and one["parent_commit"] is None
    assert c.get("/v1/checkpoints/ft").json()["id"] == two["id"]  # the name means main

    repo = c.get("/v1/repos/ft").json()
    assert repo["main"] == two["commit_id"] and repo["revisions"] == 2
    assert repo["kind"] == "model" and repo["base_id"] == base["id"]
    names = {r["name"]: r for r in c.get("/v1/repos").json()["data"]}
    assert set(names) == {"ft", base["name"]} and names[base["name"]]["kind"] == "base"

    history = c.get("/v1/repos/ft/revisions").json()["data"]
    assert [h["commit_id"] for h in history] == [two["commit_id"], one["commit_id"]]
    assert history[0]["refs"] == ["main"] and history[1]["refs"] == []
    assert history[0]["method"] == "lossless" and history[0]["stored_bytes"] == two["stored_bytes"]
    assert "lossless" in history[0]["message"] and "bytes stored" in history[0]["message"]

    for rev in (one["commit_id"], one["commit_id"][:7]):
        got = c.get(f"/v1/repos/ft/revisions/{rev}").json()
        assert got["checkpoint_id"] == one["id"]
    for ckpt, directory in ((one, models.finetune), (two, models.finetune2)):
        r = c.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
        want = (directory / "model.safetensors").read_bytes()
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(want).digest()
    assert one["id"] != two["id"]

    r = c.get("/v1/repos/ft/revisions/0000000")
    assert r.status_code == 404 and r.json()["code"] == "revision_not_found"
    r = c.get("/v1/repos/nope/revisions")
    assert r.status_code == 404 and r.json()["code"] == "repo_not_found"

    # Deleting main's revision moves main back to revision 1; its bytes are untouched.
    assert c.delete(f"/v1/repos/ft/revisions/{two['commit_id']}").status_code == 204
    assert c.get("/v1/repos/ft").json()["main"] == one["commit_id"]
    assert c.get("/v1/checkpoints/ft").json()["id"] == one["id"]
    assert c.get(f"/v1/checkpoints/{two['id']}").status_code == 404
