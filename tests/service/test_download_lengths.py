"""Every download declares the bytes it sends: for a checkpoint of every method (``auto`` and a
merge included), HEAD and GET of ``/delta`` and of each file agree with each other and with the
body actually sent; the record's ``stored_bytes`` is the delta blob's size.

``auto`` rewrites its delta's document after compressing (to record its trail), so its core
accounting (``CompressOutcome.stored_bytes``) is not the stored blob's size: a Content-Length taken
from that field made h11 abort every ``slim pull --local`` of an auto checkpoint (issue 19)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import run_stack
from tests.infra import commit_and_wait, make_base, make_checkpoint, wait_job
from tests.service.test_evaluation import calibration, tiny_bert  # noqa: F401 - fixture

#: (name, create options) — every method a checkpoint can be stored with; a merge is added.
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("magnitude", {"method": "magnitude", "keep": 0.05}),
    ("lossless", {"method": "lossless", "keep": None}),
    ("dare", {"method": "dare", "keep": 0.1, "value_bits": 4}),
    (
        "magnitude-scaled",
        {"method": "magnitude-scaled", "keep": 0.05, "options": {"grid": 3, "refine": 2}},
    ),
    ("nps", {"method": "nps", "keep": 0.05, "options": {"generations": 2}}),
    ("nps-seeded", {"method": "nps-seeded", "keep": 0.05, "options": {"generations": 2}}),
    (
        "auto",
        {"method": None, "keep": None, "min_fidelity": 0.8, "options": {"generations": 2}},
    ),
]
SEARCHED = {"magnitude-scaled", "nps", "nps-seeded", "auto"}


def check_download(client: httpx.Client, url: str) -> bytes:
    """HEAD and GET of ``url`` agree, and Content-Length is the length of the body sent."""
    head = client.head(url)
    assert head.status_code == 200, (url, head.text)
    get = client.get(url)
    assert get.status_code == 200, (url, get.text)
    assert int(get.headers["content-length"]) == len(get.content), url
    for name in ("content-length", "etag", "accept-ranges", "content-type"):
        assert head.headers.get(name) == get.headers.get(name), (url, name)
    etag = get.headers["etag"].strip('"')
    assert hashlib.sha256(get.content).hexdigest() == etag, url
    # a resumed download (what `slim pull` does after a cut) gets the rest, sized right
    tail = client.get(url, headers={"Range": f"bytes={len(get.content) // 2}-"})
    assert tail.status_code == 206
    assert int(tail.headers["content-length"]) == len(tail.content)
    assert tail.content == get.content[len(get.content) // 2 :]
    return get.content


def test_every_method_declares_the_bytes_it_sends(
    tmp_path: Path,
    tiny_bert: dict[str, Path],  # noqa: F811 - the fixture
) -> None:
    with run_stack("embedded", tmp_path) as stack:
        client = stack.client
        base = make_base(client, tiny_bert["base"])
        for f in client.get(f"/v1/bases/{base['id']}/files").json()["data"]:
            body = check_download(client, f"/v1/bases/{base['id']}/files/{f['path']}")
            assert len(body) == f["size"]

        ids: dict[str, str] = {}
        for name, options in METHODS:
            extra = {"calibration": calibration(24)} if name in SEARCHED else {}
            ckpt = make_checkpoint(
                client, base["id"], tiny_bert["ft"], name=name, **options, **extra
            )
            job = commit_and_wait(client, ckpt["id"])
            assert job["state"] == "succeeded", (name, job)
            ids[name] = ckpt["id"]
        r = client.post(
            "/v1/merges", json={"name": "merge", "checkpoint_ids": [ids["magnitude"], ids["dare"]]}
        )
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"])
        assert job["state"] == "succeeded", job
        ids["merge"] = job["checkpoint_id"]

        deltas: dict[str, int] = {}
        for name, ckpt_id in ids.items():
            info = client.get(f"/v1/checkpoints/{ckpt_id}").json()
            assert info["state"] == "ready", (name, info)
            delta = check_download(client, f"/v1/checkpoints/{ckpt_id}/delta")
            assert info["stored_bytes"] == len(delta), name
            assert info["ratio"] == pytest.approx(info["original_bytes"] / len(delta))
            deltas[hashlib.sha256(delta).hexdigest()] = len(delta)
            files = client.get(f"/v1/checkpoints/{ckpt_id}/files").json()["data"]
            assert files, name
            for f in files:
                body = check_download(client, f"/v1/checkpoints/{ckpt_id}/files/{f['path']}")
                assert len(body) == f["size"], (name, f["path"])
        assert client.get(f"/v1/checkpoints/{ids['auto']}").json()["method"] == "auto"

        stats = client.get("/v1/stats").json()
        assert stats["stored_parts"]["deltas"] == sum(deltas.values())
        assert stats["stored_bytes"] == sum(stats["stored_parts"].values())
