"""Pure ASGI middleware guarding the API: request timeouts and a cap on JSON bodies.

:class:`TimeoutMiddleware`
    A request must *start* its answer within ``timeout`` seconds of the last body bytes it
    received. A client whose body stalls that long gets 408 ``request_timeout`` (a slowloris
    upload cannot hold a connection and a thread forever); a handler that takes that long
    after the body ended gets 504 ``timeout``. Once an answer has started it is never cut: a
    long download streams for as long as it needs. The handler is cancelled; work it started
    in a thread finishes on its own and its answer is dropped.

:class:`BodyLimitMiddleware`
    Bodies of every request except file uploads (``PUT …/files/…``, which stream into the
    blob store under their own cap) are read up to ``max_bytes`` before the app sees them;
    anything longer gets 413 ``body_too_large`` without being parsed.
"""

from __future__ import annotations

import json
import logging
import re

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import STATUS_BY_CODE

log = logging.getLogger("slim.service")

#: Streamed file uploads: exempt from the JSON body cap.
_UPLOAD = re.compile(r"^/v1/(bases|checkpoints)/[^/]+/files/.+|^/api/lfs/[0-9a-f]{64}(/part/\d+)?$")
#: Hub commits (NDJSON) are read line by line with their own limits.
_STREAMED_POST = re.compile(r"^/api/models/.+/commit/[^/]+$")


async def _answer(send: Send, code: str, detail: str) -> None:
    status = STATUS_BY_CODE[code]
    body = json.dumps({"code": code, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class TimeoutMiddleware:
    """408 for a stalled body, 504 for a handler that does not start answering in time."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        last = anyio.current_time()
        headers = dict(scope["headers"])
        body_done = headers.get(b"content-length", b"0") == b"0" and (
            b"transfer-encoding" not in headers
        )
        started = responded = False
        failure: BaseException | None = None

        async def timed_receive() -> Message:
            nonlocal last, body_done
            message = await receive()
            last = anyio.current_time()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if responded:  # we answered already: the handler's late answer goes nowhere
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async with anyio.create_task_group() as tg:

            async def run() -> None:
                nonlocal failure
                try:
                    await self.app(scope, timed_receive, guarded_send)
                except Exception as exc:  # re-raised below, outside the task group
                    if responded:
                        log.warning("request answered with a timeout later failed: %r", exc)
                    else:
                        failure = exc
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(run)
            while not started:
                await anyio.sleep(max(last + self.timeout - anyio.current_time(), 0.0) + 0.01)
                if started or anyio.current_time() < last + self.timeout:
                    continue
                responded = True
                if body_done:
                    await _answer(
                        send,
                        "timeout",
                        f"the server did not start answering within {self.timeout:g}s; "
                        "retry later (the request may still complete — check before retrying)",
                    )
                else:
                    await _answer(
                        send,
                        "request_timeout",
                        f"no body bytes arrived for {self.timeout:g}s; nothing was stored — "
                        "send the request again",
                    )
                tg.cancel_scope.cancel()
                break
        if failure is not None:
            raise failure


class BodyLimitMiddleware:
    """413 for a non-upload body over ``max_bytes``; the app sees the body replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if (scope["method"] == "PUT" and _UPLOAD.match(scope["path"])) or (
            scope["method"] == "POST" and _STREAMED_POST.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        too_large = (
            f"the request body is over {self.max_bytes} bytes; send fewer calibration "
            "examples or raise SLIM_MAX_JSON_BODY_BYTES"
        )
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _answer(send, "body_too_large", too_large)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _answer(send, "body_too_large", too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
