"""API keys, roles, namespaces, the dashboard sign-in, bootstrap and open mode."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy import select

from cli.main import main as slim
from runtime.process import Runtime
from runtime.settings import Settings
from service import auth
from service.app import create_app
from service.auth import DashboardCallerDep
from storage.db import begin_write
from storage.keys import create_key, generate_key, hash_key, prefix_of, verify_key
from storage.models import ApiKey
from tests.conftest import Models, Stack, run_stack
from tests.infra import (
    TEST_ADMIN_KEY,
    LiveServer,
    commit_and_wait,
    make_base,
    make_checkpoint,
)

# -- keys ----------------------------------------------------------------------------------------


def test_key_format_and_hash() -> None:
    key = generate_key()
    assert key.startswith("slim_") and len(key) == 5 + 12 + 1 + 48
    stored = hash_key(key)
    assert stored.startswith("scrypt$") and key not in stored and key.split("_")[2] not in stored
    assert verify_key(key, stored)
    assert not verify_key(key[:-1] + ("0" if key[-1] != "0" else "1"), stored)
    assert not verify_key(key, "garbage") and not verify_key(key, "scrypt$1$2$3$@@$@@")
    assert hash_key(key) != stored  # salted
    assert prefix_of(key) == key.split("_")[1]
    assert prefix_of("a free-form bootstrap key value").startswith("x")


#: Routes authorised by a signed URL (the Hub's LFS upload and multipart URLs carry no key).
SIGNED = ("/api/lfs/{oid}", "/api/lfs/{oid}/part/{number}", "/api/lfs/{oid}/complete")


def test_every_data_route_needs_a_key(embedded: Stack, models: Models) -> None:
    base = make_base(embedded.client, models.base)
    anon = embedded.anonymous
    assert anon is not None
    app = embedded.client.get("/openapi.json").json()
    checked = 0
    for path, methods in app["paths"].items():
        if path in ("/healthz", "/readyz"):
            continue
        if path in SIGNED:  # Hub LFS uploads: the URL's signature, not a key, authorises
            for method in methods:
                url = path.replace("{oid}", "ab" * 32).replace("{number}", "1")
                query = "?size=1&exp=9999999999&key=abc&sig=" + "0" * 64
                r = anon.request(method.upper(), url + query, json={"oid": "x", "parts": []})
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                assert r.json()["code"] == "bad_upload_url"
            continue
        for method in methods:
            url = path.replace("{base_id}", base["id"]).replace("{path}", "model.safetensors")
            url = url.replace("{checkpoint_id}", "x").replace("{job_id}", "x")
            r = anon.request(method.upper(), url, json={} if method in ("post", "put") else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            if method != "head":  # HEAD answers carry no body
                assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
            checked += 1
    assert checked >= 15
    assert anon.get("/metrics").status_code == 401
    assert anon.get("/healthz").status_code == 200  # probes carry no data


def test_bad_credentials(embedded: Stack) -> None:
    url = embedded.url
    cases: dict[str, dict[str, Any]] = {
        "no key": {},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "empty bearer": {"Authorization": "Bearer"},
        "unknown key": {"Authorization": f"Bearer {generate_key()}"},
        "short": {"Authorization": "Bearer abc"},
        "huge": {"Authorization": "Bearer " + "a" * 20_000},
        "non-ascii": {"Authorization": "Bearer slim_é_padding_padding".encode()},
        "admin key in the query": {},
    }
    for name, headers in cases.items():
        params = {"key": TEST_ADMIN_KEY} if "query" in name else None
        r = httpx.get(f"{url}/v1/bases", headers=headers, params=params, timeout=30)
        assert r.status_code == 401, (name, r.text)
        assert r.json()["code"] == "unauthorized"


def test_roles(embedded: Stack, models: Models) -> None:
    reader = embedded.client_for(embedded.new_key(role="read"))
    writer = embedded.client_for(embedded.new_key(role="write"))
    admin = embedded.client
    base = make_base(writer, models.base)
    assert reader.get(f"/v1/bases/{base['id']}").status_code == 200
    assert reader.get(f"/v1/bases/{base['id']}/files/model.safetensors").status_code == 200
    r = reader.post("/v1/bases", json={"name": "nope"})
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert reader.delete(f"/v1/bases/{base['id']}").status_code == 403
    assert reader.put(f"/v1/bases/{base['id']}/files/x.json", content=b"{}").status_code == 403
    assert reader.get("/metrics").status_code == 403
    assert writer.get("/metrics").status_code == 403
    assert admin.get("/metrics").status_code == 200


def test_revocation_takes_effect_at_once(embedded: Stack) -> None:
    key = embedded.new_key(role="write")
    client = embedded.client_for(key)
    assert client.get("/v1/bases").status_code == 200
    with embedded.runtime.sessions() as session:
        from storage.keys import revoke_key

        begin_write(session)
        revoke_key(session, prefix_of(key))
        session.commit()
    r = client.get("/v1/bases")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"


def test_namespaces_are_invisible_to_each_other(stack: Stack, models: Models) -> None:
    """A key sees only its namespace: everything of another answers 404, never 403."""
    team_a = stack.client_for(stack.new_key("team-a", "write"))
    team_b = stack.client_for(stack.new_key("team-b", "admin"))
    base = make_base(team_a, models.base)
    ckpt = make_checkpoint(team_a, base["id"], models.finetune)
    job = commit_and_wait(team_a, ckpt["id"])
    assert job["state"] == "succeeded"
    bid, cid, jid = base["id"], ckpt["id"], job["id"]

    for method, url in [
        ("GET", f"/v1/bases/{bid}"),
        ("GET", f"/v1/bases/{bid}/files"),
        ("GET", f"/v1/bases/{bid}/files/model.safetensors"),
        ("HEAD", f"/v1/bases/{bid}/files/model.safetensors"),
        ("PUT", f"/v1/bases/{bid}/files/extra.json"),
        ("POST", f"/v1/bases/{bid}/commit"),
        ("DELETE", f"/v1/bases/{bid}"),
        ("GET", f"/v1/checkpoints/{cid}"),
        ("GET", f"/v1/checkpoints/{cid}/files"),
        ("GET", f"/v1/checkpoints/{cid}/files/model.safetensors"),
        ("GET", f"/v1/checkpoints/{cid}/delta"),
        ("PUT", f"/v1/checkpoints/{cid}/files/x.json"),
        ("POST", f"/v1/checkpoints/{cid}/commit"),
        ("DELETE", f"/v1/checkpoints/{cid}"),
        ("GET", f"/v1/jobs/{jid}"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
    ]:
        r = team_b.request(method, url, content=b"{}" if method == "PUT" else None)
        assert r.status_code == 404, (method, url, r.status_code, r.text)
        if method != "HEAD":
            assert r.json()["code"] == "not_found"
    r = team_b.post("/v1/checkpoints", json={"name": "x", "base_id": bid, "method": "magnitude"})
    assert r.status_code == 404
    r = team_b.post("/v1/merges", json={"name": "m", "checkpoint_ids": [cid, cid]})
    assert r.status_code in (400, 404)
    assert team_b.get("/v1/bases").json()["count"] == 0
    assert team_b.get("/v1/checkpoints").json()["count"] == 0
    assert team_b.get("/v1/jobs").json()["count"] == 0
    stats = team_b.get("/v1/stats").json()
    assert stats["num_bases"] == 0 and stats["stored_bytes"] == 0
    # the same names are free in another namespace
    assert team_b.post("/v1/bases", json={"name": base["name"]}).status_code == 201
    # and team A still has everything
    assert team_a.get(f"/v1/checkpoints/{cid}/files/model.safetensors").status_code == 200
    assert team_a.get("/v1/bases").json()["count"] == 1


# -- sign-in cookie ------------------------------------------------------------------------------


def test_sign_in_cookie(embedded: Stack) -> None:
    reader_key = embedded.new_key("team-a", "read")
    browser = embedded.client_for(None)
    form = browser.get("/signin?next=/dashboard")
    assert form.status_code == 200 and 'name="key"' in form.text and "<form" in form.text
    bad = browser.post("/signin", data={"key": generate_key(), "next": "/dashboard"})
    assert bad.status_code == 401 and "unknown" in bad.text and not browser.cookies
    r = browser.post("/signin", data={"key": reader_key, "next": "/v1/bases"})
    assert r.status_code == 303 and r.headers["location"] == "/v1/bases"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert reader_key.lower() not in cookie  # encoded, never the plain key
    assert browser.get("/v1/bases").status_code == 200  # the cookie works for reads
    # ... never for writes (a cross-site form could send it)
    r = browser.post("/v1/bases", json={"name": "x"})
    assert r.status_code == 401
    r = browser.post("/signout")
    assert r.status_code == 303 and r.headers["location"] == "/signin"
    assert browser.get("/v1/bases").status_code == 401


def test_sign_in_refuses_open_redirects_and_cross_site_posts(embedded: Stack) -> None:
    key = embedded.new_key("default", "read")
    browser = embedded.client_for(None)
    for target in ["https://evil.example/", "//evil.example/x", "/\\evil", "javascript:alert(1)"]:
        r = browser.post("/signin", data={"key": key, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard", target
    r = browser.post(
        "/signin", data={"key": key, "next": "/"}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403
    r = browser.post("/signin", content=b"key=" + b"a" * 10_000)
    assert r.status_code == 413


def test_dashboard_dependency(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bootstrap_key=TEST_ADMIN_KEY)
    runtime = Runtime.from_settings(settings)
    app = create_app(settings, runtime=runtime)

    @app.get("/test-page")
    def page(caller: DashboardCallerDep) -> dict[str, str]:
        return {"namespace": caller.namespace, "role": caller.role.value}

    try:
        with LiveServer(app) as server, httpx.Client(base_url=server.url) as browser:
            r = browser.get("/test-page?x=1", headers={"Accept": "text/html"})
            assert r.status_code == 303
            assert r.headers["location"] == "/signin?next=/test-page%3Fx%3D1"
            r = browser.get("/test-page", headers={"Accept": "application/json"})
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert browser.post("/signin", data={"key": TEST_ADMIN_KEY}).status_code == 303
            assert browser.get("/test-page").json() == {"namespace": "default", "role": "admin"}
            bearer = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
            assert httpx.get(f"{server.url}/test-page", headers=bearer).status_code == 200
    finally:
        runtime.close()


# -- bootstrap, open mode, CLI -------------------------------------------------------------------


def test_first_start_creates_and_prints_one_admin_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = Runtime.from_settings(Settings(data_dir=tmp_path))
    try:
        token = auth.bootstrap(runtime)
        assert token is not None and token.startswith("slim_")
        auth.announce_first_key(token)
        assert token in capsys.readouterr().err
        assert auth.bootstrap(runtime) is None  # only on a fresh install
        with runtime.sessions() as session:
            rows = session.scalars(select(ApiKey)).all()
            assert [(r.role.value, r.namespace) for r in rows] == [("admin", "default")]
            assert rows[0].key_hash != token
    finally:
        runtime.close()


def test_bootstrap_key_setting(tmp_path: Path) -> None:
    given = "my-own-admin-key-" + os.urandom(8).hex()  # free-form values are fine
    runtime = Runtime.from_settings(Settings(data_dir=tmp_path, bootstrap_key=given))
    try:
        assert auth.bootstrap(runtime) is None
        assert auth.lookup(runtime, given, "bearer") is not None
        with runtime.sessions() as session:
            from storage.keys import revoke_key

            begin_write(session)
            revoke_key(session, prefix_of(given))
            session.commit()
        assert auth.bootstrap(runtime) is None  # a revoked bootstrap key stays revoked
        assert auth.lookup(runtime, given, "bearer") is None
    finally:
        runtime.close()


def test_open_mode_only_on_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match=r"127\.0\.0\.1"):
        Settings(open=True, host="0.0.0.0")
    os.environ["SLIM_OPEN"] = "true"
    try:
        rc = slim(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    finally:
        del os.environ["SLIM_OPEN"]
    assert rc == 2 and "invalid_settings" in capsys.readouterr().err
    with run_stack("embedded", tmp_path, workers=0, open=True) as s:
        assert s.anonymous is not None
        assert s.anonymous.post("/v1/bases", json={"name": "b"}).status_code == 201
        assert s.anonymous.get("/metrics").status_code == 200


def test_keys_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert slim(["migrate", *data]) == 0  # `slim keys` never creates a database
    capsys.readouterr()
    assert slim(["keys", "create", "--namespace", "ml-team", "--role", "write", *data]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("slim_") and "shown only this once" in out.err
    assert slim(["keys", "list", *data]) == 0
    listing = capsys.readouterr().out
    assert prefix_of(key) in listing and "ml-team" in listing and key not in listing
    assert slim(["keys", "revoke", prefix_of(key), *data]) == 0
    assert slim(["keys", "list", "--json", *data]) == 0
    assert '"revoked_at": null' not in capsys.readouterr().out
    assert slim(["keys", "revoke", "nope", *data]) == 2
    assert "[not_found]" in capsys.readouterr().err
    assert slim(["keys", "create", "--namespace", "bad ns!", *data]) == 2
    assert "[invalid_argument]" in capsys.readouterr().err


def test_keys_cli_beside_a_running_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The embedded server keeps its SQLite database open and writes to it; the CLI takes the
    # write lock up front and waits its turn, and the key works at once.
    with run_stack("embedded", tmp_path) as s:
        for i in range(5):
            assert s.client.post("/v1/bases", json={"name": f"b{i}"}).status_code == 201
        data = ["--data-dir", str(s.settings.data_dir)]
        assert slim(["keys", "create", "--namespace", "ml-team", "--role", "read", *data]) == 0
        key = capsys.readouterr().out.strip()
        client = s.client_for(key)
        r = client.get("/v1/bases")
        assert r.status_code == 200 and r.json()["count"] == 0  # another namespace's view
        assert slim(["keys", "revoke", prefix_of(key), *data]) == 0
        assert client.get("/v1/bases").status_code == 401


def test_create_key_refuses_weak_given_values(tmp_path: Path) -> None:
    runtime = Runtime.from_settings(Settings(data_dir=tmp_path))
    try:
        with runtime.sessions() as session, pytest.raises(ValueError):
            create_key(session, token="short")
    finally:
        runtime.close()


def test_routes_declare_auth_errors() -> None:
    app = create_app(Settings(bootstrap_key=TEST_ADMIN_KEY))
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/v1/"):
            assert 401 in route.responses and 403 in route.responses, route.path
