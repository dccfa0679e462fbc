"""One connection to a Slimstore server: the URL and API key (``Authorization: Bearer``),
timeouts, paging, and every failure turned into the SDK's error tree."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx

from client.errors import ApiError, ConnectionFailed, Unauthorized, error_from_response

__all__ = ["DEFAULT_URL", "Connection"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Rows asked for per page of a listing.
PAGE = 1000


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
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport or httpx.HTTPTransport(retries=2),
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

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

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every row of a paged listing."""
        offset = 0
        while True:
            page = self.json("GET", path, params={**params, "limit": PAGE, "offset": offset})
            yield from page["data"]
            if len(page["data"]) < PAGE:
                return
            offset += PAGE

    def unreachable(self, exc: Exception) -> ConnectionFailed:
        """The error for a request that got no answer."""
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionFailed(
                f"the Slimstore server at {self.url} stopped answering ({type(exc).__name__}); "
                "run the command again — transfers resume where they stopped"
            )
        if isinstance(exc, httpx.ConnectError):
            return ConnectionFailed(
                f"cannot reach the Slimstore server at {self.url} ({exc}); start one with "
                "`slim serve` or point --url / SLIM_URL at it"
            )
        return ConnectionFailed(
            f"the connection to {self.url} broke ({type(exc).__name__}: {exc}); run the "
            "command again — transfers resume where they stopped"
        )

    def error(self, response: httpx.Response) -> ApiError:
        """The error for an error answer (read here, streamed or not)."""
        response.read()
        error = error_from_response(response)
        if isinstance(error, Unauthorized) and not self.api_key:
            error.detail += " (no API key was sent: pass --api-key or set SLIM_API_KEY)"
        return error
