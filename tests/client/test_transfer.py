"""``client.transfer.download`` against a real HTTP server on loopback: bodies read straight
into buffers (``http.client``) or through httpx (an injected transport), resumed with Range,
every byte checked against the sha256 ETag."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import xxhash

from client import transfer
from client.errors import ConnectionFailed, IntegrityError, NotFound
from client.http import Connection
from client.models import NoProgress
from core.files import HEADER_XXH3

DATA = os.urandom(5 * (16 << 10) + 123)  # several 16 kB buffers and a partial one
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class Served:
    """What the server sends (``body``, possibly tampered with) and what it was asked."""

    body: bytes = DATA
    etag: str = SHA
    requests: list[dict[str, str]] = field(default_factory=list)
    cut_after: int | None = None  # close the connection after this many body bytes
    bodies: dict[str, bytes] = field(default_factory=dict)  # by path, instead of ``body``
    pause: float = 0.0  # seconds to wait after the first half of a body
    active: int = 0
    most_at_once: int = 0  # the most bodies that were being sent at once
    lock: threading.Lock = field(default_factory=threading.Lock)
    xxh3: str | None = None  # sent as X-Slim-Xxh3 when set (what the service sends)


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
        body, etag = s.body, s.etag
        if self.path in s.bodies:
            body = s.bodies[self.path]
            etag = hashlib.sha256(body).hexdigest()
        start = 0
        rng = self.headers.get("Range")
        if rng and self.headers.get("If-Range", f'"{etag}"') == f'"{etag}"':
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("ETag", f'"{etag}"')
        if s.xxh3 is not None:
            self.send_header(HEADER_XXH3, s.xxh3)
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if s.cut_after is not None:
            self.wfile.write(part[: s.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        with s.lock:
            s.active += 1
            s.most_at_once = max(s.most_at_once, s.active)
        try:
            half = len(part) // 2 if s.pause else 0
            self.wfile.write(part[:half])
            self.wfile.flush()
            time.sleep(s.pause)
            self.wfile.write(part[half:])
        finally:
            with s.lock:
                s.active -= 1


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


def test_an_xxh3_the_server_names_checks_the_body_instead_of_sha256(
    served: tuple[str, Served], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With X-Slim-Xxh3 (a rebuilt file's recorded digest) the body, resumed or whole, is
    checked by xxh3-128 and never hashed by sha256; the file's sha256 reported is the one the
    server recorded. A flipped byte is still caught and nothing kept."""
    url, state = served
    state.xxh3 = xxhash.xxh3_128_hexdigest(DATA)
    hashed: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> object:
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(transfer.hashlib, "sha256", counting)
    for i, conn in enumerate(_connections(url)):
        got = _get(conn, tmp_path / f"f{i}")
        assert got.sha256 == SHA and (tmp_path / f"f{i}").read_bytes() == DATA
        (tmp_path / f"r{i}.incomplete").write_bytes(DATA[:40_000])
        got = _get(conn, tmp_path / f"r{i}")
        assert got.resumed_from == 40_000 and (tmp_path / f"r{i}").read_bytes() == DATA
        conn.close()
    assert hashed == [0] * 4  # created (unused) before the answer named its xxh3
    state.body = DATA[:70_000] + bytes([DATA[70_000] ^ 1]) + DATA[70_001:]
    with pytest.raises(IntegrityError, match="xxh3-128"):
        _get(Connection(url), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.incomplete").exists()


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


def _wanted(tmp_path: Path, bodies: dict[str, bytes]) -> list[transfer.Wanted]:
    return [
        transfer.Wanted(
            url,
            tmp_path / "d" / url.rsplit("/", 1)[1],
            url,
            len(body),
            hashlib.sha256(body).hexdigest(),
        )
        for url, body in bodies.items()
    ]


def test_files_are_read_two_at_a_time_each_checked(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    sizes = [100, 70_000, 5, 200_000, 0, 33_000]
    bodies = {f"/v1/file/{i}": os.urandom(n) for i, n in enumerate(sizes)}
    state.bodies, state.pause = dict(bodies), 0.2
    conn = Connection(url)
    got = transfer.download_all(conn, _wanted(tmp_path, bodies), NoProgress())
    assert [g.path for g in got] == list(bodies)  # in the order asked, whatever finished first
    for g, (path, body) in zip(got, bodies.items(), strict=True):
        assert (tmp_path / "d" / path.rsplit("/", 1)[1]).read_bytes() == body
        assert g.sha256 == hashlib.sha256(body).hexdigest() and g.size == len(body)
    assert state.most_at_once == transfer.STREAMS == 2
    assert not list((tmp_path / "d").glob("*.incomplete"))
    conn.close()


def test_a_corrupted_file_among_several_fails_the_pull_and_is_not_kept(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    bodies = {f"/v1/file/{i}": os.urandom(n) for i, n in enumerate([90_000, 60_000, 300])}
    state.bodies = dict(bodies)
    bad = bytearray(bodies["/v1/file/1"])
    bad[30_000] ^= 1
    state.bodies["/v1/file/1"] = bytes(bad)  # what the server sends; the listing says otherwise
    conn = Connection(url)
    with pytest.raises(IntegrityError, match="nothing was kept"):
        transfer.download_all(conn, _wanted(tmp_path, bodies), NoProgress())
    assert not (tmp_path / "d" / "1").exists() and not (tmp_path / "d" / "1.incomplete").exists()
    for name in ("0", "2"):  # whole and checked, a prefix kept to resume, or not begun
        whole, part = tmp_path / "d" / name, tmp_path / "d" / f"{name}.incomplete"
        body = bodies[f"/v1/file/{name}"]
        if whole.exists():
            assert whole.read_bytes() == body
        elif part.exists():
            assert body.startswith(part.read_bytes())
    state.bodies = dict(bodies)
    got = transfer.download_all(conn, _wanted(tmp_path, bodies), NoProgress())
    assert [(tmp_path / "d" / g.path.rsplit("/", 1)[1]).read_bytes() for g in got] == list(
        bodies.values()
    )
    conn.close()


def _follow(conn: Connection, target: Path) -> transfer.FollowedDownload:
    return transfer.FollowedDownload(
        lambda landed: transfer.fetch(
            conn,
            "/v1/file",
            target,
            size=len(DATA),
            sha256=SHA,
            progress=NoProgress(),
            landed=landed,
        ),
        len(DATA),
    )


def test_a_followed_download_is_read_as_it_lands_and_checked_at_its_end(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    state.pause = 0.5
    conn = Connection(url)
    follow = _follow(conn, tmp_path / "f")
    part = tmp_path / "f.incomplete"
    follow.wait(20_000)  # returns once those bytes are written, while the rest is to come
    assert 20_000 <= part.stat().st_size < len(DATA)
    assert part.read_bytes()[:20_000] == DATA[:20_000]
    follow.wait(len(DATA))  # the whole body, and its sha256 matched
    assert follow.result().sha256 == SHA
    assert part.read_bytes() == DATA and not (tmp_path / "f").exists()  # the caller moves it
    conn.close()


def test_a_followed_download_that_does_not_match_fails_its_reader(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    state.body = DATA[:60_000] + bytes([DATA[60_000] ^ 1]) + DATA[60_001:]
    conn = Connection(url)
    follow = _follow(conn, tmp_path / "f")
    follow.wait(10_000)  # bytes that are there can be read ...
    with pytest.raises(IntegrityError):  # ... but the whole never passes
        follow.wait(len(DATA))
    assert not (tmp_path / "f.incomplete").exists()
    assert isinstance(follow.stop(), IntegrityError)
    conn.close()


def test_a_stopped_followed_download_keeps_its_part_to_resume(
    served: tuple[str, Served], tmp_path: Path
) -> None:
    url, state = served
    state.pause = 0.5
    conn = Connection(url)
    follow = _follow(conn, tmp_path / "f")
    follow.wait(10_000)
    assert follow.stop() is None  # stopped by its reader: no error of its own
    kept = (tmp_path / "f.incomplete").read_bytes()
    assert 10_000 <= len(kept) < len(DATA) and DATA.startswith(kept)
    state.pause = 0.0
    assert _get(conn, tmp_path / "f").resumed_from == len(kept)
    assert (tmp_path / "f").read_bytes() == DATA
    conn.close()
