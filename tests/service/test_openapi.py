"""The API's own docs (issue 19, item 6): ``/docs`` and ``/redoc`` with local assets, the bearer
security scheme, enums made from core's lists, the file routes' headers and statuses — each
checked against what the running service actually does — and names accepted wherever ids are.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from core.methods import REGISTRY
from core.params import EVAL_KINDS, MERGE_METHODS, VALUE_BITS
from tests.conftest import Models, Stack
from tests.infra import commit_and_wait, make_base, make_checkpoint, wait_job
from tests.security.test_auth import SIGNED


class _Assets(HTMLParser):
    """Every URL a page loads by itself: scripts, stylesheets, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in ("script", "img") and found.get("src"):
            self.urls.append(str(found["src"]))
        if tag == "link" and found.get("href"):
            self.urls.append(str(found["href"]))


@pytest.mark.parametrize(("page", "script"), [("/docs", "SwaggerUIBundle"), ("/redoc", "Redoc")])
def test_doc_pages_load_everything_from_the_server(embedded: Stack, page: str, script: str) -> None:
    r = embedded.anonymous.get(page)  # no key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in r.text
    parser = _Assets()
    parser.feed(r.text)
    assert parser.urls, r.text
    for url in parser.urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} remotely"
        asset = embedded.anonymous.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url
    assert not re.search(r"https?://(?!127\.0\.0\.1|localhost)", _loaded_urls(r.text))
    bundle = next(u for u in parser.urls if u.endswith(".js"))
    assert script in embedded.anonymous.get(bundle).text[:1_000_000]


def _loaded_urls(html: str) -> str:
    """The src/href/url values of a page (text that names where something is fetched from)."""
    return " ".join(re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]?([^'")\s>]+)""", html))


def test_bearer_scheme_is_on_exactly_the_routes_that_need_a_key(embedded: Stack) -> None:
    doc = embedded.anonymous.get("/openapi.json").json()
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            secured = op.get("security") == [{"bearer": []}]
            if not secured:
                # probes; and the Hub's LFS upload URLs, authorised by their signature
                # (tests/security/test_auth.py checks they refuse a bad one)
                assert path in ("/healthz", "/readyz", *SIGNED), (method, path)
                continue
            # Without a key the route answers 401 (before it looks at anything else).
            url = re.sub(r"\{[^}]+\}", "x", path)
            r = embedded.anonymous.request(method.upper(), url)
            assert r.status_code == 401, (method, path, r.status_code)
            if method != "head":
                assert r.json()["code"] == "unauthorized"
            assert "401" in op["responses"], (method, path)


def test_choices_are_enums_made_from_core(embedded: Stack, models: Models) -> None:
    doc = embedded.client.get("/openapi.json").json()
    props = doc["components"]["schemas"]["CheckpointCreate"]["properties"]

    def enum(name: str) -> list[Any]:
        return next(a["enum"] for a in props[name]["anyOf"] if "enum" in a)

    assert enum("method") == [*(str(m) for m in REGISTRY), "auto"]
    assert enum("evaluation") == list(EVAL_KINDS)
    assert enum("value_bits") == list(VALUE_BITS)
    merge = doc["components"]["schemas"]["MergeCreate"]["properties"]["method"]
    assert merge["enum"] == list(MERGE_METHODS)
    base = make_base(embedded.client, models.base)
    for field, bad, choice in (
        ("method", "zip", "'magnitude-scaled'"),
        ("evaluation", "vibes", "'accuracy'"),
        ("value_bits", 5, "16"),
    ):
        body = {"name": "x", "base_id": base["id"], field: bad}
        r = embedded.client.post("/v1/checkpoints", json=body)
        assert r.status_code == 422, r.text
        error = r.json()
        assert set(error) == {"code", "detail"} and error["code"] == "validation_error"
        assert error["detail"].startswith(f"{field}: ") and choice in error["detail"], error
    assert embedded.client.get("/v1/checkpoints").json()["count"] == 0  # nothing was created


FILE_ROUTES = (
    "/v1/bases/{base_id}/files/{path}",
    "/v1/checkpoints/{checkpoint_id}/files/{path}",
    "/v1/checkpoints/{checkpoint_id}/delta",
)


def test_file_routes_document_head_headers_and_statuses(embedded: Stack) -> None:
    doc = embedded.anonymous.get("/openapi.json").json()
    for path in FILE_ROUTES:
        ops = doc["paths"][path]
        assert {"get", "head"} <= set(ops), path
        for method in ("get", "head"):
            op = ops[method]
            headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
            assert headers == {"Range", "If-Range", "If-None-Match"}, (method, path)
            answers = op["responses"]
            assert {"200", "206", "304", "416"} <= set(answers), (method, path)
            assert {"ETag", "Accept-Ranges", "Content-Length"} <= set(answers["200"]["headers"])
            assert "Content-Range" in answers["206"]["headers"]
            assert "Content-Range" in answers["416"]["headers"]
            assert ("content" in answers["200"]) == (method == "get")
    scale = [
        p
        for p in doc["paths"]["/v1/checkpoints/{checkpoint_id}/files/{path}"]["get"]["parameters"]
        if p["name"] == "scale"
    ]
    assert scale and scale[0]["in"] == "query" and scale[0]["description"]
    for owner in ("bases/{base_id}", "checkpoints/{checkpoint_id}"):
        put = doc["paths"][f"/v1/{owner}/files/{{path}}"]["put"]
        assert "X-Slim-Sha256" in {p["name"] for p in put["parameters"]}


def test_file_answers_send_what_the_schema_declares(embedded: Stack, models: Models) -> None:
    """Every status and header the document promises for the file routes, seen on the wire."""
    client = embedded.client
    base = make_base(client, models.base)
    ckpt = make_checkpoint(client, base["id"], models.finetune)
    assert commit_and_wait(client, ckpt["id"])["state"] == "succeeded"
    doc = client.get("/openapi.json").json()
    urls = {
        FILE_ROUTES[0]: f"/v1/bases/{base['id']}/files/model.safetensors",
        FILE_ROUTES[1]: f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors",
        FILE_ROUTES[2]: f"/v1/checkpoints/{ckpt['id']}/delta",
    }
    for route, url in urls.items():
        for method in ("GET", "HEAD"):
            declared = doc["paths"][route][method.lower()]["responses"]
            whole = client.request(method, url)
            etag = whole.headers["etag"]
            size = int(whole.headers["content-length"])
            cases: list[tuple[dict[str, str], int]] = [
                ({}, 200),
                ({"Range": "bytes=0-99"}, 206),
                ({"Range": "bytes=0-99", "If-Range": etag}, 206),
                ({"Range": "bytes=0-99", "If-Range": '"other"'}, 200),
                ({"If-None-Match": etag}, 304),
                ({"Range": f"bytes={size}-"}, 416),
            ]
            for headers, status in cases:
                r = client.request(method, url, headers=headers)
                assert r.status_code == status, (method, url, headers, r.status_code)
                for name in declared[str(status)].get("headers", {}):
                    assert name.lower() in r.headers, (method, url, status, name)
                if status == 206:
                    assert r.headers["content-range"] == f"bytes 0-99/{size}"
                if method == "GET" and status in (200, 206):
                    assert len(r.content) == int(r.headers["content-length"])


def test_names_work_wherever_ids_do(embedded: Stack, models: Models) -> None:
    """Create, upload, commit, describe, pull, filter, merge and delete by name."""
    client = embedded.client
    r = client.post("/v1/bases", json={"name": "minilm"})
    assert r.status_code == 201
    base_id = r.json()["id"]
    for rel in ("model.safetensors", "config.json", "tokenizer/vocab.txt"):
        body = (models.base / rel).read_bytes()
        assert client.put(f"/v1/bases/minilm/files/{rel}", content=body).status_code == 200
    assert client.post("/v1/bases/minilm/commit").json()["state"] == "ready"
    assert client.get("/v1/bases/minilm").json()["id"] == base_id
    for name, directory in (("sentiment", models.finetune), ("topics", models.finetune2)):
        body = {"name": name, "base_id": "minilm", "method": "magnitude", "keep": 0.1}
        r = client.post("/v1/checkpoints", json=body)
        assert r.status_code == 201 and r.json()["base_id"] == base_id
        for rel in ("model.safetensors", "config.json"):
            content = (directory / rel).read_bytes()
            r = client.put(f"/v1/checkpoints/{name}/files/{rel}", content=content)
            assert r.status_code == 200, r.text
        job = client.post(f"/v1/checkpoints/{name}/commit")
        assert job.status_code == 202, job.text
    ckpt = client.get("/v1/checkpoints/sentiment").json()
    assert [f["path"] for f in client.get("/v1/checkpoints/sentiment/files").json()["data"]] == [
        "config.json",
        "model.safetensors",
    ]
    jobs = client.get("/v1/jobs", params={"checkpoint_id": "sentiment"}).json()["data"]
    assert [j["checkpoint_id"] for j in jobs] == [ckpt["id"]]
    for name in ("sentiment", "topics"):
        job = client.get("/v1/jobs", params={"checkpoint_id": name}).json()["data"][0]
        assert wait_job(client, job["id"])["state"] == "succeeded"
    listed = client.get("/v1/checkpoints", params={"base_id": "minilm"}).json()
    assert {c["name"] for c in listed["data"]} == {"sentiment", "topics"}
    by_name = client.get("/v1/checkpoints/sentiment/files/model.safetensors")
    by_id = client.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
    assert by_name.status_code == 200 and by_name.content == by_id.content
    assert client.head("/v1/checkpoints/sentiment/delta").status_code == 200
    twice = client.post(
        "/v1/merges", json={"name": "self", "checkpoint_ids": ["sentiment", ckpt["id"]]}
    )
    assert twice.status_code == 400 and "twice" in twice.json()["detail"], twice.text
    merge = client.post(
        "/v1/merges", json={"name": "both", "checkpoint_ids": ["sentiment", "topics"]}
    )
    assert merge.status_code == 202, merge.text
    # Another namespace's names are not found, exactly like its ids.
    stranger = embedded.client_for(embedded.new_key("team-b", "write"))
    for url in ("/v1/checkpoints/sentiment", "/v1/bases/minilm"):
        r = stranger.get(url)
        assert r.status_code == 404 and "team-b" in r.json()["detail"], r.text
    r = client.get("/v1/checkpoints/nope")
    assert r.status_code == 404
    assert r.json()["detail"].startswith("no checkpoint has the id or name 'nope'")
    r = client.get("/v1/checkpoints", params={"base_id": "nope"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    _wait_all(client)
    assert client.delete("/v1/checkpoints/both").status_code == 204
    assert client.get("/v1/checkpoints/both").status_code == 404


def _wait_all(client: httpx.Client) -> None:
    for job in client.get("/v1/jobs").json()["data"]:
        wait_job(client, job["id"])
