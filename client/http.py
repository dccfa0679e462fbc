"""One connection to a Slimstore server: the URL and API key (``Authorization: Bearer``),
timeouts, paging, and every failure turned into the SDK's error tree.

File bodies (:meth:`Connection.body`) are read straight from the socket into the caller's
buffers with the standard library's ``http.client``: httpx hands a body over in 64 KiB pieces,
each copied a few times on its way through h11 and the chunker, which capped a pull near a third
of what curl reads from the same server. Every other request, and every body when a transport
was passed in or a proxy applies to the URL, goes through httpx.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import httpx

from client.errors import ApiError, ConnectionFailed, Unauthorized, error_from_response

__all__ = ["DEFAULT_URL", "Body", "Connection"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Rows asked for per page of a listing.
PAGE = 1000
#: Seconds to wait for a TCP (and TLS) connection.
CONNECT_TIMEOUT = 10.0


class Body(Protocol):
    """An answer whose body is read into the caller's buffers."""

    status_code: int
    headers: httpx.Headers

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with the next bytes of the body (fewer only at its end); 0 at the end."""
        ...


class _SocketBody:
    """A body read with ``http.client`` (into the caller's buffer: one copy, by the kernel)."""

    def __init__(self, response: http.client.HTTPResponse, conn: Connection) -> None:
        self._r, self._conn = response, conn
        self.status_code = response.status
        self.headers = httpx.Headers(response.getheaders())

    def readinto(self, buffer: memoryview) -> int:
        got = 0
        try:
            while got < len(buffer):
                n = self._r.readinto(buffer[got:])
                if not n:
                    if self._r.length:  # http.client reads a body cut short as its end
                        raise http.client.IncompleteRead(b"", self._r.length)
                    break
                got += n
        except (OSError, http.client.HTTPException) as exc:
            raise self._conn.unreachable(exc) from exc
        return got


class _HttpxBody:
    """A body read through httpx (when a transport was passed in, or behind a proxy)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self._chunks = response.iter_bytes()
        self._left = memoryview(b"")

    def readinto(self, buffer: memoryview) -> int:
        got = 0
        while got < len(buffer):
            if not self._left:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._left = memoryview(chunk)
            n = min(len(self._left), len(buffer) - got)
            buffer[got : got + n] = self._left[:n]
            self._left, got = self._left[n:], got + n
        return got


class Connection:
    """An httpx client bound to one server.

    Args:
        url: the server (default ``$SLIM_URL`` or http://127.0.0.1:8000).
        api_key: sent as ``Authorization: Bearer`` (default ``$SLIM_API_KEY``; none if unset).
        timeout: seconds to wait for a connection or for the next bytes of an answer.
        transport: an httpx transport (tests pass a mock one).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("SLIM_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("SLIM_API_KEY") or None
        headers = {"User-Agent": "slimstore-client/1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._timeout = timeout
        self._direct = transport is None
        self._ssl: ssl.SSLContext | None = None
        # one kept ``http.client`` connection per thread reading bodies (a pull reads several
        # files at once); every one is closed by :meth:`close`
        self._local = threading.local()
        self._opened: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport or httpx.HTTPTransport(retries=2),
            follow_redirects=False,
        )

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, set()
        for conn in opened:
            conn.close()
        self._local = threading.local()
        self._http.close()

    def release(self) -> None:
        """Close the calling thread's kept connection for bodies (a thread that ends)."""
        self._drop_raw()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer; a transport failure or an error answer raises :class:`ApiError`."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if response.status_code >= 400:
            raise self.error(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def stream(
        self, method: str, path: str, **kwargs: Any
    ) -> AbstractContextManager[httpx.Response]:
        """The answer as a stream, as is: the caller checks the status (:meth:`error`) and maps
        transport failures (:meth:`unreachable`)."""
        return self._http.stream(method, path, **kwargs)

    @contextmanager
    def body(
        self,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Iterator[Body]:
        """``GET path`` as a :class:`Body`, as is: the caller checks the status (:meth:`error`
        takes the body's ``response``); transport failures raise :class:`ConnectionFailed`.
        Safe to call from several threads at once (each reads on a connection of its own)."""
        if not self._direct or _proxied(self.url):
            try:
                with self._http.stream("GET", path, headers=headers, params=params) as r:
                    body = _HttpxBody(r)
                    yield body
            except httpx.TransportError as exc:
                raise self.unreachable(exc) from exc
            return
        parts = urlsplit(self.url)
        target = parts.path.rstrip("/") + path + (f"?{urlencode(params)}" if params else "")
        sent = dict(self._http.headers) | {"Accept-Encoding": "identity"} | (headers or {})
        response = self._raw_get(target, sent)
        done = False
        try:
            yield _SocketBody(response, self)
            done = response.isclosed()  # read to its end: the connection can be reused
        finally:
            if not done:
                self._drop_raw()

    def _raw_get(self, target: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The answer's head on the kept ``http.client`` connection (a new one if it was closed
        by the server meanwhile)."""
        for attempt in (0, 1):
            kept = self._raw
            if kept is not None and kept.sock is None:  # the server closed it
                self._drop_raw()
                kept = None
            fresh = kept is None
            conn = kept or self._connect()
            try:
                conn.request("GET", target, headers=headers)
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._drop_raw()
                if fresh or attempt:  # a kept connection may have timed out: retry once
                    raise self.unreachable(exc) from exc
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(
                parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT
            )
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise self.unreachable(exc, connecting=True) from exc
        if conn.sock is not None:
            conn.sock.settimeout(self._timeout)
        self._local.raw = conn
        with self._lock:
            self._opened.add(conn)
        return conn

    @property
    def _raw(self) -> http.client.HTTPConnection | None:
        """This thread's kept connection for bodies."""
        raw: http.client.HTTPConnection | None = getattr(self._local, "raw", None)
        return raw

    def _drop_raw(self) -> None:
        raw = self._raw
        if raw is not None:
            raw.close()
            self._local.raw = None
            with self._lock:
                self._opened.discard(raw)

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every row of a paged listing."""
        offset = 0
        while True:
            page = self.json("GET", path, params={**params, "limit": PAGE, "offset": offset})
            yield from page["data"]
            if len(page["data"]) < PAGE:
                return
            offset += PAGE

    def unreachable(self, exc: Exception, *, connecting: bool = False) -> ConnectionFailed:
        """The error for a request that got no answer (or whose answer broke off)."""
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return ConnectionFailed(
                f"the Slimstore server at {self.url} stopped answering ({type(exc).__name__}); "
                "run the command again — transfers resume where they stopped"
            )
        if isinstance(exc, httpx.ConnectError) or connecting:
            return ConnectionFailed(
                f"cannot reach the Slimstore server at {self.url} ({exc}); start one with "
                "`slim serve` or point --url / SLIM_URL at it"
            )
        return ConnectionFailed(
            f"the connection to {self.url} broke ({type(exc).__name__}: {exc}); run the "
            "command again — transfers resume where they stopped"
        )

    def error(self, response: httpx.Response | Body) -> ApiError:
        """The error for an error answer (read here, streamed or not)."""
        if isinstance(response, _HttpxBody):
            response = response.response
        elif not isinstance(response, httpx.Response):
            content = bytearray()
            piece = memoryview(bytearray(1 << 16))
            while len(content) < 1 << 20 and (n := response.readinto(piece)):
                content += piece[:n]
            kept = {
                k: v
                for k, v in response.headers.items()
                if k not in ("content-length", "transfer-encoding")
            }
            response = httpx.Response(
                response.status_code,
                headers=kept,
                content=bytes(content),
                request=httpx.Request("GET", self.url),
            )
        response.read()
        error = error_from_response(response)
        if isinstance(error, Unauthorized) and not self.api_key:
            error.detail += " (no API key was sent: pass --api-key or set SLIM_API_KEY)"
        return error


def _proxied(url: str) -> bool:
    """Whether the environment names a proxy for ``url`` (httpx honours it; ``http.client``
    would not, so such bodies go through httpx)."""
    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    if not {parts.scheme, "all"} & proxies.keys():
        return False
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    return not bypass(parts.hostname or "", proxies)
