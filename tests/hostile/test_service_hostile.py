"""Every case of the hostile corpus pushed through the real service (embedded and distributed):
each gets its stable code — a 4xx before anything is stored or queued, a failed job for what
only the tensor data shows (NaN/Inf), a clean client-side error for files that never reach the
server — and the server keeps serving a good checkpoint, bit for bit, throughout.

Stored-state cases plant hostile deltas or tamper with stored blobs: the pull answers the code
(``integrity_error`` …) or is cut short, never completed with wrong bytes; ``slim scrub``'s
report names what is broken.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import update

from core.errors import SlimError
from core.evaluate import load_calibration
from migrations.api import migrate
from storage.blobstore import LocalBlobStore
from storage.db import begin_write
from storage.models import Checkpoint
from storage.repo import record_blob
from storage.scrub import scrub
from tests.conftest import Stack, run_stack
from tests.hostile.corpus import DEFAULT_DIR, HOSTILE_LIMITS, Case, build, load
from tests.infra import PostgresServer, file_chunks, wait_job

CASES = load()
BY_KIND: dict[str, list[Case]] = {}
for _case in CASES:
    BY_KIND.setdefault(_case.kind, []).append(_case)


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def hostile(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A live service with the corpus limits, a ready base (``_base``) and a ready checkpoint
    (``_ft``, magnitude) of it."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"hostile-{kind}")
    extra: dict[str, Any] = {}
    db_url = None
    if kind == "distributed":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        db_url = postgres.create()
        migrate(db_url)
        extra = {"pg": db_url, "s3": request.getfixturevalue("s3_endpoint")}
    try:
        with run_stack(kind, tmp, **extra, **HOSTILE_LIMITS) as stack:
            client = stack.client
            base = client.post("/v1/bases", json={"name": "hostile-base"}).json()
            _put(
                client,
                f"/v1/bases/{base['id']}/files/model.safetensors",
                DEFAULT_DIR / "_base/model.safetensors",
            )
            assert client.post(f"/v1/bases/{base['id']}/commit").status_code == 200
            good = _checkpoint(client, base["id"], "good")
            _put(
                client,
                f"/v1/checkpoints/{good['id']}/files/model.safetensors",
                DEFAULT_DIR / "_ft/model.safetensors",
            )
            job = client.post(f"/v1/checkpoints/{good['id']}/commit").json()
            assert wait_job(client, job["id"])["state"] == "succeeded"
            pulled = client.get(f"/v1/checkpoints/{good['id']}/files/model.safetensors")
            assert pulled.status_code == 200
            yield {
                "stack": stack,
                "base": base,
                "good": good,
                "good_sha256": hashlib.sha256(pulled.content).hexdigest(),
                "counter": [0],
            }
    finally:
        if db_url is not None:
            request.getfixturevalue("postgres").drop(db_url)


def _put(client: httpx.Client, url: str, path: Path) -> httpx.Response:
    r = client.put(
        url, content=file_chunks(path), headers={"content-length": str(path.stat().st_size)}
    )
    assert r.status_code == 200, r.text
    return r


def _checkpoint(client: httpx.Client, base_id: str, name: str, **params: Any) -> dict[str, Any]:
    body = {"name": name, "base_id": base_id, "method": "magnitude", "keep": 0.2, **params}
    r = client.post("/v1/checkpoints", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _fresh(h: dict[str, Any], prefix: str) -> dict[str, Any]:
    h["counter"][0] += 1
    return _checkpoint(h["stack"].client, h["base"]["id"], f"{prefix}-{h['counter'][0]}")


def _still_serving(h: dict[str, Any]) -> None:
    """The server answers and the good checkpoint still pulls back bit for bit."""
    client = h["stack"].client
    assert client.get("/healthz").status_code == 200
    r = client.get(f"/v1/checkpoints/{h['good']['id']}/files/model.safetensors")
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == h["good_sha256"]


def _error(r: httpx.Response) -> str:
    assert r.headers.get("content-type", "").startswith("application/json"), r.text[:200]
    body = r.json()
    assert set(body) == {"code", "detail"} and body["detail"], body
    return str(body["code"])


# -- the corpus itself ---------------------------------------------------------------------------


def test_checked_in_corpus_is_what_the_script_writes(tmp_path: Path) -> None:
    fresh = build(tmp_path)
    assert len([p for p in DEFAULT_DIR.rglob("*") if p.is_file()]) >= 40
    assert [(c.name, c.kind, c.code, c.service_code) for c in fresh] == [
        (c.name, c.kind, c.code, c.service_code) for c in CASES
    ]
    for case in fresh:
        if case.path is None or case.kind == "delta":  # deltas carry timings: not byte-stable
            continue
        checked_in = DEFAULT_DIR / case.path.relative_to(tmp_path)
        assert checked_in.read_bytes() == case.path.read_bytes(), (
            f"{case.name}: run `python -m tests.hostile.corpus` and commit tests/hostile/files"
        )


# -- uploads: refused as they stream -------------------------------------------------------------


def test_weight_uploads_get_their_code(hostile: dict[str, Any]) -> None:
    stack: Stack = hostile["stack"]
    ckpt = _fresh(hostile, "uploads")
    before = {e.key for e in stack.runtime.store.list_keys("sha256/")}
    cases = BY_KIND["safetensors"] + [
        c for c in BY_KIND["limit"] if c.path is not None and c.path.suffix == ".safetensors"
    ]
    seen = {}
    for case in cases:
        assert case.path is not None
        r = stack.client.put(
            f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors", content=case.path.read_bytes()
        )
        seen[case.name] = (r.status_code, _error(r))
    wrong = {n: s for n, s in seen.items() if not (400 <= s[0] < 500)}
    assert not wrong, wrong
    mismatched = {
        c.name: (seen[c.name][1], c.service_code)
        for c in cases
        if seen[c.name][1] != c.service_code
    }
    assert not mismatched, mismatched
    files = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()
    assert files["count"] == 0  # nothing was kept
    assert {e.key for e in stack.runtime.store.list_keys("sha256/")} == before
    assert stack.client.get(f"/v1/jobs?checkpoint_id={ckpt['id']}").json()["count"] == 0
    _still_serving(hostile)


def test_paths_get_invalid_path(hostile: dict[str, Any]) -> None:
    stack: Stack = hostile["stack"]
    ckpt = _fresh(hostile, "paths")
    names = json.loads((DEFAULT_DIR / "paths.json").read_text())
    for case in BY_KIND["path"]:
        raw = names[case.name]
        url = f"{stack.url}/v1/checkpoints/{ckpt['id']}/files/{_encode_path(raw)}"
        r = stack.client.put(httpx.URL(url), content=b"{}")
        code = _error(r)
        assert (r.status_code, code) == (400, case.service_code), (case.name, raw, r.text)
    assert stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["count"] == 0
    _still_serving(hostile)


def _encode_path(raw: str) -> str:
    """Percent-encode a path so the client sends it as is (no dot-segment removal)."""
    return "/".join(
        "%2E" * len(seg) if seg in (".", "..") else quote(seg, safe="") for seg in raw.split("/")
    )


# -- calibration: a clean client error, or the service's code ------------------------------------


def test_calibration_files(hostile: dict[str, Any], tmp_path: Path) -> None:
    stack: Stack = hostile["stack"]
    cases = BY_KIND["calibration"] + [
        c for c in BY_KIND["limit"] if c.path and c.path.suffix == ".jsonl"
    ]
    for case in cases:
        assert case.path is not None
        # The client (`slim push --calibration FILE`) reads the file first.
        try:
            examples = [
                {"text": e.text, "label": e.label}
                for e in load_calibration(case.path, need_labels=False)
            ]
            client_code = None
        except SlimError as exc:
            client_code = exc.code
        # Whatever parses as JSON is also sent raw, as a client that skips the checks would.
        raw = _json_lines(case.path)
        if client_code is not None:
            assert client_code == case.code, case.name
            if raw is None:
                continue
            examples = raw
        h = hostile["counter"]
        h[0] += 1
        body = {
            "name": f"calibration-{h[0]}",
            "base_id": hostile["base"]["id"],
            "method": "magnitude",
            "keep": 0.2,
            "evaluation": "accuracy",
            "calibration": examples,
        }
        r = stack.client.post("/v1/checkpoints", json=body)
        assert 400 <= r.status_code < 500, (case.name, r.text)
        assert _error(r) == case.service_code, (case.name, r.text)
    _still_serving(hostile)


def _json_lines(path: Path) -> list[Any] | None:
    try:
        lines = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError):
        return None
    return lines or None


# -- models that do not fit the base -------------------------------------------------------------


def test_models_that_do_not_fit_the_base(hostile: dict[str, Any]) -> None:
    stack: Stack = hostile["stack"]
    for case in BY_KIND["model"]:
        assert case.path is not None
        ckpt = _fresh(hostile, case.name.replace("_", "-"))
        _put(stack.client, f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors", case.path)
        r = stack.client.post(f"/v1/checkpoints/{ckpt['id']}/commit")
        if r.status_code == 202:  # only the tensor data shows it: the job fails with the code
            job = wait_job(stack.client, r.json()["id"])
            assert job["state"] == "failed", (case.name, job)
            assert job["error"]["code"] == case.service_code, (case.name, job["error"])
            state = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"]
            assert state == "failed"
        else:
            assert r.status_code == 400, (case.name, r.text)
            assert _error(r) == case.service_code, case.name
            jobs = stack.client.get(f"/v1/jobs?checkpoint_id={ckpt['id']}").json()
            assert jobs["count"] == 0
    _still_serving(hostile)


# -- hostile stored state ------------------------------------------------------------------------


@contextmanager
def _delta_swapped(h: dict[str, Any], key: str) -> Iterator[None]:
    """Point the good checkpoint at another delta blob for a while."""
    stack: Stack = h["stack"]
    with stack.runtime.sessions() as session:
        begin_write(session)
        old = session.get(Checkpoint, h["good"]["id"])
        assert old is not None
        original = old.delta_blob_key
        session.execute(
            update(Checkpoint).where(Checkpoint.id == old.id).values(delta_blob_key=key)
        )
        session.commit()
    try:
        yield
    finally:
        with stack.runtime.sessions() as session:
            begin_write(session)
            session.execute(
                update(Checkpoint)
                .where(Checkpoint.id == h["good"]["id"])
                .values(delta_blob_key=original)
            )
            session.commit()


def _pull_outcome(client: httpx.Client, url: str) -> tuple[int, str | None]:
    """(status, code) of a JSON error answer, or (status, "cut") for a stream cut short."""
    try:
        with client.stream("GET", url) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, _error(r)
            got = sum(len(c) for c in r.iter_bytes())
            assert got < int(r.headers["content-length"])  # never a complete wrong file
            return r.status_code, "cut"
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return 200, "cut"


def test_planted_deltas_never_give_a_wrong_model(hostile: dict[str, Any]) -> None:
    stack: Stack = hostile["stack"]
    url = f"/v1/checkpoints/{hostile['good']['id']}/files/model.safetensors"
    for case in BY_KIND["delta"]:
        assert case.path is not None
        info = stack.runtime.store.put_file(case.path)
        with stack.runtime.sessions() as session:
            begin_write(session)
            record_blob(session, info)
            session.commit()
        with _delta_swapped(hostile, info.key):
            status, code = _pull_outcome(stack.client, url)
        # An error found before the first byte is answered with its code; one found inside a
        # tensor (a tampered frame, a zstd bomb) cuts the stream.
        assert code in (case.code, "cut"), (case.name, status, code)
        if code != "cut":
            assert status >= 400
        _still_serving(hostile)


def _object_bytes(stack: Stack, key: str) -> bytes:
    return b"".join(stack.runtime.store.open_range(key))


def _overwrite(stack: Stack, key: str, data: bytes | None) -> None:
    """Replace the stored object under ``key`` (None: delete it), bypassing the store's checks;
    a cached local copy (S3) is damaged the same way."""
    store = stack.runtime.store
    local = store.root.joinpath(*key.split("/")) if isinstance(store, LocalBlobStore) else None
    targets = [local] if local is not None else []
    if local is None:
        s3 = stack.runtime.store
        client = s3._client  # type: ignore[attr-defined]
        full = s3.prefix + key  # type: ignore[attr-defined]
        if data is None:
            client.delete_object(Bucket=s3.bucket, Key=full)  # type: ignore[attr-defined]
        else:
            client.put_object(Bucket=s3.bucket, Key=full, Body=data)  # type: ignore[attr-defined]
        cached = stack.runtime.cache.root / "blobs" / key
        if cached.exists():
            targets.append(cached)
    for path in targets:
        if path.exists():
            path.chmod(0o644)
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x40
    return bytes(out)


def test_tampered_stored_blobs(hostile: dict[str, Any]) -> None:
    stack: Stack = hostile["stack"]
    good, base = hostile["good"], hostile["base"]
    ckpt_url = f"/v1/checkpoints/{good['id']}/files/model.safetensors"
    base_url = f"/v1/bases/{base['id']}/files/model.safetensors"
    with stack.runtime.sessions() as session:
        row = session.get(Checkpoint, good["id"])
        assert row is not None and row.delta_blob_key is not None
        delta_key = row.delta_blob_key
    base_key = next(f for f in stack.client.get(f"/v1/bases/{base['id']}/files").json()["data"])[
        "sha256"
    ]
    base_key = f"sha256/{base_key[:2]}/{base_key}"
    delta, base_bytes = _object_bytes(stack, delta_key), _object_bytes(stack, base_key)
    expect = {c.name: c.code for c in BY_KIND["stored"]}

    tampering = {
        "stored_tampered_delta_blob": (delta_key, _flip(delta, len(delta) // 2), ckpt_url),
        "stored_truncated_delta_blob": (delta_key, delta[: len(delta) // 2], ckpt_url),
        "stored_missing_delta_blob": (delta_key, None, ckpt_url),
        "stored_tampered_base_blob": (base_key, _flip(base_bytes, len(base_bytes) - 3), ckpt_url),
    }
    assert set(tampering) == set(expect)
    for name, (key, data, url) in tampering.items():
        original = base_bytes if key == base_key else delta
        _overwrite(stack, key, data)
        try:
            status, code = _pull_outcome(stack.client, url)
            assert code in (expect[name], "cut"), (name, status, code)
            if name == "stored_tampered_base_blob":  # the base file itself: cut, or refused
                assert _pull_outcome(stack.client, base_url)[1] in ("cut", "integrity_error")
            report = scrub(stack.runtime.sessions, stack.runtime.store)
            assert not report.ok and {p.key for p in report.problems} == {key}, report
        finally:
            _overwrite(stack, key, original)
        _still_serving(hostile)
    assert scrub(stack.runtime.sessions, stack.runtime.store).ok


def test_hostile_deltas_fail_cleanly_in_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The delta cases through `slim reconstruct` (a client rebuilding a pulled delta): one
    line naming the code, exit status 2, no traceback, no complete wrong file."""
    from cli.main import main

    for case in BY_KIND["delta"]:
        assert case.path is not None
        out = tmp_path / case.name
        rc = main(["reconstruct", str(DEFAULT_DIR / "_base"), str(case.path), "-o", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, case.name
        assert f"[{case.code}]" in err and "Traceback" not in err, (case.name, err)
        assert len(err.strip().splitlines()) == 1
