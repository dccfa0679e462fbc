"""What a push is told and what a failed one leaves (issue 19, items 3 and 4), against the real
app: the default without calibration is exact and says so; an explicit lossy choice without
calibration is stored as asked with a warning; a name in use resumes with the same options, is
a 409 naming the others, and is replaced when its holder failed unstored; a commit that fails
validation leaves the checkpoint failed with its bytes for garbage collection; files the
service does not read are refused at PUT."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

from core.files import manifest_sha256
from core.safetensors_io import save_file
from storage.gc import collect_garbage
from tests.conftest import Models, Stack
from tests.infra import commit_and_wait, make_base, push_dir, tiny_model, tiny_tensors

CALIBRATION = [{"text": "a fine day"}, {"text": "a dull day"}]


def create(stack: Stack, base_id: str, name: str = "ft", **body: object) -> tuple[int, dict]:
    r = stack.client.post("/v1/checkpoints", json={"name": name, "base_id": base_id, **body})
    return r.status_code, r.json()


def blob_keys(stack: Stack) -> set[str]:
    return {e.key for e in stack.runtime.store.list_keys("sha256/")}


def mismatched(tmp_path: Path) -> Path:
    """A model directory whose tensors do not fit the synthetic base (other shapes)."""
    wrong = {n: torch.ones(*(d + 1 for d in t.shape)) for n, t in tiny_tensors(0).items()}
    return tiny_model(tmp_path / "wrong", wrong, config={"model_type": "other"})


# -- item 3: the default never stores an unmeasured loss ----------------------------------------


def test_default_push_is_exact_and_says_how_to_get_smaller(
    embedded: Stack, models: Models, tmp_path: Path
) -> None:
    base = make_base(embedded.client, models.base)
    status, ckpt = create(embedded, base["id"])
    assert status == 201 and ckpt["method"] == "lossless", ckpt
    assert ckpt["params"]["evaluation"] == "weights"
    [note] = ckpt["warnings"]
    assert "stored exact" in note and "--min-fidelity 0.99 --calibration FILE" in note
    push_dir(embedded.client, "checkpoints", ckpt["id"], models.finetune)
    assert commit_and_wait(embedded.client, ckpt["id"])["state"] == "succeeded"
    done = embedded.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    assert done["state"] == "ready" and done["method"] == "lossless"
    pulled = embedded.client.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
    want = (models.finetune / "model.safetensors").read_bytes()
    assert hashlib.sha256(pulled.content).digest() == hashlib.sha256(want).digest()


@pytest.mark.parametrize(
    ("body", "method"),
    [
        ({"method": "magnitude", "keep": 0.1}, "magnitude"),
        ({"method": "nps"}, "nps"),
        ({"keep": 0.05}, "nps"),  # a keep ratio is a lossy choice too
        ({"value_bits": 8}, "nps"),
    ],
    ids=["magnitude-keep", "nps", "keep-only", "bits-only"],
)
def test_explicit_lossy_without_calibration_warns(
    embedded: Stack, models: Models, body: dict, method: str
) -> None:
    base = make_base(embedded.client, models.base)
    status, ckpt = create(embedded, base["id"], **body)
    assert status == 201 and ckpt["method"] == method, ckpt
    assert ckpt["params"]["keep"] == body.get("keep", 0.01)
    [warning] = ckpt["warnings"]
    assert "not measured" in warning and "--calibration FILE" in warning


def test_calibrated_and_lossless_pushes_have_no_loss_warning(
    embedded: Stack, models: Models
) -> None:
    base = make_base(embedded.client, models.base)
    status, measured = create(embedded, base["id"], "a", calibration=CALIBRATION)
    assert status == 201 and measured["method"] == "nps" and measured["warnings"] == []
    assert measured["params"]["evaluation"] == "fidelity"
    status, auto = create(embedded, base["id"], "b", min_fidelity=0.99, calibration=CALIBRATION)
    assert status == 201 and auto["method"] == "auto" and auto["warnings"] == []
    status, exact = create(embedded, base["id"], "c", method="lossless")
    assert status == 201 and exact["warnings"] == []  # asked for: nothing to add


# -- item 4: a name in use ------------------------------------------------------------------------


def test_same_options_resume_other_options_are_409(embedded: Stack, models: Models) -> None:
    base = make_base(embedded.client, models.base)
    status, first = create(embedded, base["id"], method="magnitude", keep=0.1)
    assert status == 201
    status, again = create(embedded, base["id"], method="magnitude", keep=0.1)
    assert status == 200 and again["id"] == first["id"] and again["warnings"]
    status, err = create(embedded, base["id"], method="lossless")
    assert status == 409 and err["code"] == "options_differ", err
    assert "method: asked lossless, stored magnitude" in err["detail"]
    assert "slim rm ft" in err["detail"]
    status, err = create(embedded, base["id"], method="magnitude", keep=0.2, seed=3)
    assert status == 409 and "keep: asked 0.2, stored 0.1" in err["detail"]
    assert "seed: asked 3, stored 0" in err["detail"]
    status, err = create(
        embedded, base["id"], method="magnitude", keep=0.1, calibration=CALIBRATION
    )
    assert status == 409 and "calibration: asked 2 examples, stored 0" in err["detail"]
    assert "evaluation: asked fidelity, stored weights" in err["detail"]
    # Once ready, the name is a repository's: the same files with the same options (their
    # manifest sent) are a no-op; another push starts its next revision, to which the rules
    # above apply while it is in flight.
    push_dir(embedded.client, "checkpoints", first["id"], models.finetune)
    assert commit_and_wait(embedded.client, first["id"])["state"] == "succeeded"
    ready = embedded.client.get(f"/v1/checkpoints/{first['id']}").json()
    assert ready["repo"] == "ft" and ready["revision"] == 1 and len(ready["commit_id"]) == 40
    files = embedded.client.get(f"/v1/checkpoints/{first['id']}/files").json()["data"]
    manifest = manifest_sha256((f["path"], f["sha256"]) for f in files)
    status, same = create(
        embedded, base["id"], method="magnitude", keep=0.1, manifest_sha256=manifest
    )
    assert status == 200 and same["id"] == first["id"] and same["state"] == "ready"
    status, second = create(embedded, base["id"])
    assert status == 201 and second["id"] != first["id"] and second["commit_id"] is None
    status, err = create(embedded, base["id"], method="magnitude", keep=0.1)
    assert status == 409 and "method: asked magnitude, stored lossless" in err["detail"]
    main = embedded.client.get("/v1/checkpoints/ft").json()
    assert main["id"] == first["id"]  # the name means main until the new revision is ready


# -- item 4: failed commits clean up -------------------------------------------------------------


def test_failed_commit_leaves_a_failed_checkpoint_and_garbage(
    embedded: Stack, models: Models, tmp_path: Path
) -> None:
    base = make_base(embedded.client, models.base)
    stored_before = embedded.client.get("/v1/stats").json()["stored_bytes"]
    _, ckpt = create(embedded, base["id"], method="magnitude", keep=0.1)
    push_dir(embedded.client, "checkpoints", ckpt["id"], mismatched(tmp_path))
    uploaded = blob_keys(embedded)
    r = embedded.client.post(f"/v1/checkpoints/{ckpt['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "base_mismatch"
    assert "now failed" in r.json()["detail"] and "push again" in r.json()["detail"]
    assert embedded.client.get("/v1/jobs").json()["count"] == 0
    failed = embedded.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    assert failed["state"] == "failed" and failed["error"].startswith("base_mismatch: ")
    assert failed["original_bytes"] == 0
    listing = embedded.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()
    assert listing["count"] == 0
    assert embedded.client.get("/v1/stats").json()["stored_bytes"] == stored_before
    report = collect_garbage(embedded.runtime.sessions, embedded.runtime.store, 0)
    gone = uploaded - blob_keys(embedded)
    assert len(gone) == 2 and set(report.deleted_keys) >= gone, report  # weights and config
    base_files = embedded.client.get(f"/v1/bases/{base['id']}/files").json()["data"]
    assert all(f["stored"] for f in base_files)  # the base's blobs were kept

    # The same options resume the failed checkpoint with the right files.
    status, again = create(embedded, base["id"], method="magnitude", keep=0.1)
    assert status == 200 and again["id"] == ckpt["id"] and again["state"] == "failed"
    push_dir(embedded.client, "checkpoints", ckpt["id"], models.finetune)
    assert commit_and_wait(embedded.client, ckpt["id"])["state"] == "succeeded"


def test_other_options_replace_a_failed_unstored_checkpoint(
    embedded: Stack, models: Models, tmp_path: Path
) -> None:
    base = make_base(embedded.client, models.base)
    _, old = create(embedded, base["id"], method="magnitude", keep=0.1)
    push_dir(embedded.client, "checkpoints", old["id"], mismatched(tmp_path))
    assert embedded.client.post(f"/v1/checkpoints/{old['id']}/commit").status_code == 400
    status, new = create(embedded, base["id"], method="lossless")
    assert status == 201 and new["id"] != old["id"] and new["state"] == "uploading"
    assert embedded.client.get(f"/v1/checkpoints/{old['id']}").status_code == 404
    names = [c["name"] for c in embedded.client.get("/v1/checkpoints").json()["data"]]
    assert names == ["ft"]


# -- item 4: files the service does not read -----------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["pytorch_model.bin", "model.pt", "sub/weights.pth", "last.ckpt", "opt.pkl", "x.PICKLE"],
)
def test_unread_files_are_refused_at_put(embedded: Stack, models: Models, path: str) -> None:
    base = make_base(embedded.client, models.base)
    _, ckpt = create(embedded, base["id"])
    before = blob_keys(embedded)
    body = pickle.dumps({"weights": [1.0, 2.0]})
    r = embedded.client.put(f"/v1/checkpoints/{ckpt['id']}/files/{path}", content=body)
    assert r.status_code == 415 and r.json()["code"] == "unsupported_file", r.text
    assert "safe_serialization=True" in r.json()["detail"]
    assert blob_keys(embedded) == before
    assert embedded.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["count"] == 0


def test_a_pickle_under_another_name_is_refused(embedded: Stack, models: Models) -> None:
    base = make_base(embedded.client, models.base)
    _, ckpt = create(embedded, base["id"])
    before = blob_keys(embedded)
    for protocol in (2, 4, 5):
        body = pickle.dumps({"weights": list(range(100))}, protocol=protocol)
        r = embedded.client.put(f"/v1/checkpoints/{ckpt['id']}/files/extra.dat", content=body)
        assert r.status_code == 415 and r.json()["code"] == "unsupported_file", r.text
    assert blob_keys(embedded) == before
    bases = embedded.client.post("/v1/bases", json={"name": "b2"}).json()
    r = embedded.client.put(f"/v1/bases/{bases['id']}/files/pytorch_model.bin", content=b"PK")
    assert r.status_code == 415  # bases too
    ok = embedded.client.put(f"/v1/checkpoints/{ckpt['id']}/files/notes.txt", content=b"\x80hi")
    assert ok.status_code == 200  # one byte of 0x80 is not a pickle


def test_safetensors_named_bin_is_not_special(embedded: Stack, tmp_path: Path) -> None:
    # The refusal is by the name's ending: a *.safetensors file is always weights.
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    base = embedded.client.post("/v1/bases", json={"name": "b"}).json()
    r = embedded.client.put(
        f"/v1/bases/{base['id']}/files/bin.safetensors",
        content=(tmp_path / "m.safetensors").read_bytes(),
    )
    assert r.status_code == 200 and r.json()["role"] == "weights"
