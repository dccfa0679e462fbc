"""Moving bytes between the event loop and blocking code without a round trip per chunk.

Downloads (:func:`produced_in_thread`): a blocking chunk iterator — reconstruction, hashing,
blob reads — runs in its own thread and hands chunks to the event loop through a bounded
queue, so rebuilding and hashing the next chunks overlap with sending this one. Starlette's
own way (one worker-thread hop per ``next()``) makes producing and sending strictly take
turns; on two cores that halved throughput.

Uploads (:func:`body_in_thread`): an event-loop task reads the request body ahead and merges
uvicorn's small body messages (~64 KiB) into chunks of about :data:`BODY_CHUNK` bytes, which
the blocking consumer (hash, header check, blob write) takes from a bounded queue: one thread
hop per chunk instead of one per body message, and reading overlaps with writing.

Both queues hold at most ``depth`` chunks (an upload: two of ~4 MiB, one being merged and one
being written), so memory stays bounded whatever the sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

#: Chunks kept in flight between the producing thread and the event loop (each chunk of a
#: download may pin a rebuilt piece; 16 streams hold 16 x this many).
DEPTH = 2
#: Body bytes merged before the blocking consumer takes them.
BODY_CHUNK = 4 << 20
#: Longest a received body part waits for more to merge with (seconds).
FLUSH_AFTER = 0.05

_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def produced_in_thread(chunks: Iterator[Any], depth: int = DEPTH) -> AsyncIterator[Any]:
    """Iterate a blocking iterator in a dedicated thread, at most ``depth`` chunks ahead.

    An exception raised by the iterator is raised here, after the chunks produced before it.
    When the consumer stops early (client gone, task cancelled) the thread stops at its next
    chunk and the iterator is closed in that thread (its files are released there)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[Any] = asyncio.Queue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()

    def post(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(ready.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody to hand to
            stop.set()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not slots.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                post(chunk)
            post(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            if not stop.is_set():
                post(_Failed(exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="slim-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = await ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
            slots.release()
    finally:
        stop.set()
        slots.release()


@asynccontextmanager
async def body_in_thread(
    stream: AsyncIterator[bytes], chunk: int = BODY_CHUNK, depth: int = 2
) -> AsyncIterator[Iterator[bytes]]:
    """A blocking iterator over a request body, read ahead by a task on the event loop.

    Use as ``async with body_in_thread(request.stream()) as body:`` and consume ``body`` in a
    worker thread inside the block. An error while reading (the client went away) is raised
    in the consumer. Leaving the block stops the reader; the rest of the body is left unread.
    """
    loop = asyncio.get_running_loop()
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    slots = anyio.Semaphore(depth)

    def consume() -> Iterator[bytes]:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            loop.call_soon_threadsafe(slots.release)
            yield item

    pending: list[bytes] = []
    size = 0
    received = 0  # body messages read so far: the flusher's clock

    async def hand_over() -> None:
        nonlocal pending, size
        await slots.acquire()
        if not pending:  # the other side handed it over while this one waited for a slot
            slots.release()
            return
        items.put(b"".join(pending))
        pending, size = [], 0

    async def flush_stalled() -> None:
        # what has arrived goes on after FLUSH_AFTER even if the body stalls: a slow client's
        # bytes keep reaching the store (and refreshing its temp file)
        seen = -1
        while True:
            await asyncio.sleep(FLUSH_AFTER)
            if pending and seen == received:
                await hand_over()
            seen = received

    async def read() -> None:
        # one plain await per body message: a task and a timed wait per ~64 KiB message cost
        # the event loop more than the bytes did once ten uploads ran at once
        nonlocal size, received
        flusher = asyncio.ensure_future(flush_stalled())
        try:
            async for part in stream:
                if part:
                    pending.append(part)
                    size += len(part)
                    received += 1
                    if size >= chunk:
                        await hand_over()
            if pending:
                await hand_over()
            items.put(_END)
        except BaseException as exc:  # the consumer must never wait for a reader that is gone
            items.put(_Failed(exc if isinstance(exc, Exception) else BodyNotRead()))
            raise
        finally:
            flusher.cancel()

    reader = asyncio.ensure_future(read())
    try:
        yield consume()
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader


class BodyNotRead(Exception):
    """The request body stopped being read (the request was cancelled)."""
