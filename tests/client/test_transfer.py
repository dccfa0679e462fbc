"""``client.transfer.download`` against a real HTTP server on loopback: bodies read straight
into buffers (``http.client``) or through httpx (an injected transport), resumed with Range,
every byte checked against the sha256 ETag."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from client import transfer
from client.errors import ConnectionFailed, IntegrityError, NotFound
from client.http import Connection
from client.models import NoProgress

DATA = os.urandom(5 * (16 << 10) + 123)  # several 16 kB buffers and a partial one
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class Served:
    """What the server sends (``body``, possibly tampered with) and what it was asked."""

    body: bytes = DATA
    etag: str = SHA
    requests: list[dict[str, str]] = field(default_factory=list)
    cut_after: int | None = None  # close the connection after this many body bytes


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: Served

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        s = self.served
        s.requests.append({k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
        if not self.path.startswith("/v1/file"):
            body = json.dumps({"code": "not_found", "detail": "no such file"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and self.headers.get("If-Range", f'"{s.etag}"') == f'"{s.etag}"':
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(s.body) - 1}/{len(s.body)}")
        else:
            self.send_response(200)
        part = s.body[start:]
        self.send_header("ETag", f'"{s.etag}"')
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if s.cut_after is not None:
            self.wfile.write(part[: s.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


@pytest.fixture
def served() -> Iterator[tuple[str, Served]]:
    state = Served()
    handler = type("Handler", (_Handler,), {"served": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "CHUNK_SIZE", 16 << 10)


def _connections(url: str) -> list[Connection]:
    """The direct reader, and httpx (a transport passed in) on the same server."""
    return [Connection(url), Connection(url, transport=httpx.HTTPTransport())]


def _get(conn: Connection, target: Path, sha256: str | None = SHA) -> transfer.PulledFile:
    return transfer.download(
        conn, "/v1/file", target, size=len(DATA), sha256=sha256, progress=NoProgress()
    )


def test_buffered_download_reassembles_the_body_exactly(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    for i, conn in enumerate(_connections(url)):
        got = _get(conn, tmp_path / f"f{i}", sha256=None)  # checked against the ETag alone
        assert (tmp_path / f"f{i}").read_bytes() == DATA and got.sha256 == SHA
        assert not (tmp_path / f"f{i}.incomplete").exists()
        conn.close()
    assert state.requests[0]["accept-encoding"] == "identity"
    assert state.requests[0]["user-agent"].startswith("slimstore-client")


def test_the_kept_connection_serves_the_next_file(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    conn = Connection(url, api_key="k")
    for name in ("a", "b", "c"):
        _get(conn, tmp_path / name)
    assert [r["authorization"] for r in state.requests] == ["Bearer k"] * 3
    conn.close()


def test_a_partial_file_resumes_with_range(served: tuple[str, Served], tmp_path: Path) -> None:
    url, state = served
    for i, conn in enumerate(_connections(url)):
        target = tmp_path / f"f{i}"
        (tmp_path / f"f{i}.incomplete").write_bytes(DATA[:40_000])
        got = _get(conn, target)
        assert got.resumed_from == 40_000 and target.read_bytes() == DATA
        assert state.requests[-1]["range"] == "bytes=40000-"
        assert state.requests[-1]["if-range"] == f'"{SHA}"'
        conn.close()


def test_a_corrupted_byte_is_caught_and_nothing_kept(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    state.body = DATA[:70_000] + bytes([DATA[70_000] ^ 1]) + DATA[70_001:]
    for i, conn in enumerate(_connections(url)):
        with pytest.raises(IntegrityError):
            _get(conn, tmp_path / f"f{i}")
        assert not (tmp_path / f"f{i}").exists()
        assert not (tmp_path / f"f{i}.incomplete").exists()
        conn.close()


def test_a_stale_partial_file_is_fetched_whole_again(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    conn = Connection(url)
    (tmp_path / "f.incomplete").write_bytes(b"\0" * 30_000)
    got = _get(conn, tmp_path / "f")
    assert got.resumed_from == 0 and (tmp_path / "f").read_bytes() == DATA
    assert "range" not in state.requests[-1]  # the second try asked for the whole file
    conn.close()


def test_a_broken_body_keeps_a_prefix_to_resume_from(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    state.cut_after = 50_000
    conn = Connection(url)
    with pytest.raises(ConnectionFailed, match="transfers resume"):
        _get(conn, tmp_path / "f")
    kept = (tmp_path / "f.incomplete").read_bytes()
    assert kept and DATA.startswith(kept)
    state.cut_after = None
    assert _get(conn, tmp_path / "f").resumed_from == len(kept)
    assert (tmp_path / "f").read_bytes() == DATA
    conn.close()


def test_error_answers_keep_their_code(served: tuple[str, Served], tmp_path: Path) -> None:
    url, _ = served
    for conn in _connections(url):
        with pytest.raises(NotFound, match="no such file"):
            transfer.download(
                conn, "/v1/missing", tmp_path / "m", size=1, sha256=None, progress=NoProgress()
            )
        conn.close()


def test_an_unreachable_server_says_so(tmp_path: Path) -> None:
    from tests.infra import free_port

    conn = Connection(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionFailed, match="cannot reach"):
        _get(conn, tmp_path / "f")
