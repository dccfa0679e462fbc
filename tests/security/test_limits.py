"""Request timeouts, the JSON body cap, and values the database cannot take."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from service.middleware import TimeoutMiddleware
from tests.conftest import Stack, run_stack
from tests.infra import AUTH_HEADERS, LiveServer


def _slow_app(timeout: float) -> TimeoutMiddleware:
    async def slow(_: Request) -> JSONResponse:
        await anyio.sleep(5)
        return JSONResponse({"late": True})

    async def stream(_: Request) -> StreamingResponse:
        async def chunks() -> Iterator[bytes]:  # type: ignore[misc]
            for _ in range(4):
                yield b"x" * 10
                await anyio.sleep(0.5)

        return StreamingResponse(chunks())  # type: ignore[arg-type]

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    app = Starlette(
        routes=[
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/echo", echo, methods=["POST"]),
        ]
    )
    return TimeoutMiddleware(app, timeout=timeout)


def test_timeout_middleware() -> None:
    with LiveServer(_slow_app(1.0)) as server:
        t0 = time.monotonic()
        r = httpx.get(f"{server.url}/slow", timeout=30)
        assert r.status_code == 504 and r.json()["code"] == "timeout"
        assert time.monotonic() - t0 < 4
        # an answer that has started is never cut, however long it streams
        r = httpx.get(f"{server.url}/stream", timeout=30)
        assert r.status_code == 200 and r.content == b"x" * 40

        def dribble() -> Iterator[bytes]:
            for _ in range(4):  # slower than nothing, but never 1 s without bytes
                yield b"y" * 10
                time.sleep(0.4)

        r = httpx.post(f"{server.url}/echo", content=dribble(), timeout=30)
        assert r.status_code == 200 and r.json() == {"size": 40}
        assert _stalled_upload(server.url, "/echo") == 408


def _stalled_upload(url: str, path: str, headers: dict[str, str] | None = None) -> int:
    """Send a request whose body stops after a few bytes; the status the server answers."""
    host, port = url.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n{extra}\r\n"
            ).encode()
            + b"0123456789"
        )
        data = sock.recv(65536)
    return int(data.split(b" ")[1])


def test_stalled_upload_gets_408_and_nothing_is_kept(tmp_path: Path) -> None:
    with run_stack("embedded", tmp_path, workers=0, request_timeout_seconds=1.0) as stack:
        base = stack.client.post("/v1/bases", json={"name": "b"}).json()
        host, port = stack.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                (
                    f"PUT /v1/bases/{base['id']}/files/model.safetensors HTTP/1.1\r\n"
                    f"Host: {host}\r\nContent-Length: 100000\r\n"
                    f"Authorization: {AUTH_HEADERS['Authorization']}\r\n\r\n"
                ).encode()
                + b"\x10\x00\x00\x00\x00\x00\x00\x00{"
            )
            t0 = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after it
                answer += chunk
            assert time.monotonic() - t0 < 10
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"request_timeout" in answer
        deadline = time.monotonic() + 10
        while list(stack.runtime.store.list_keys("")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the upload thread sees the connection close and cleans up
        assert not list(stack.runtime.store.list_keys(""))
        assert stack.client.get(f"/v1/bases/{base['id']}/files").json()["count"] == 0
        assert stack.client.get("/v1/bases").status_code == 200


def test_json_body_cap(tmp_path: Path) -> None:
    with run_stack("embedded", tmp_path, workers=0, max_json_body_bytes=2048) as stack:
        big = {"name": "x" * 200, "base_id": "b", "calibration": [{"text": "t" * 100}] * 30}
        r = stack.client.post("/v1/checkpoints", json=big)
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"name": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = stack.client.post("/v1/bases", content=chunks())
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"
        assert stack.client.post("/v1/bases", json={"name": "ok"}).status_code == 201


def test_values_the_database_refuses_are_4xx(distributed: Stack) -> None:
    client = distributed.client
    for url in [
        "/v1/bases/a%00b",
        "/v1/checkpoints/%00",
        "/v1/jobs/%00",
        "/v1/jobs?checkpoint_id=%00",
        "/v1/checkpoints?base_id=%00",
        "/v1/bases?offset=100000000000000000000000",
    ]:
        r = client.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
    r = client.post("/v1/bases", json={"name": "a\u0000b"})
    assert 400 <= r.status_code < 500
