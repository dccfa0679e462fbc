"""The hand-over between blocking code and the event loop (service/streaming.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio.to_thread
import pytest

from service.streaming import body_in_thread, produced_in_thread


class Source:
    """A blocking iterator that records how far it was read and whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.produced = 0
        self.closed = threading.Event()
        self.threads: set[str] = set()

    def __iter__(self) -> Iterator[bytes]:
        return self.gen()

    def gen(self) -> Iterator[bytes]:
        try:
            for i in range(self.n):
                self.threads.add(threading.current_thread().name)
                if i == self.fail_at:
                    raise ValueError(f"broken at {i}")
                self.produced += 1
                yield bytes([i % 256]) * 10
        finally:
            self.closed.set()


def test_chunks_arrive_in_order_from_another_thread() -> None:
    src = Source(50)

    async def main() -> list[bytes]:
        return [c async for c in produced_in_thread(iter(src), depth=3)]

    got = asyncio.run(main())
    assert got == [bytes([i]) * 10 for i in range(50)]
    assert src.closed.is_set()
    assert src.threads == {"slim-stream"}


def test_an_error_is_raised_after_the_chunks_before_it() -> None:
    src = Source(10, fail_at=4)

    async def main() -> list[bytes]:
        out = []
        with pytest.raises(ValueError, match="broken at 4"):
            async for c in produced_in_thread(iter(src)):
                out.append(c)
        return out

    assert len(asyncio.run(main())) == 4
    assert src.closed.wait(5)


def test_the_producer_stays_bounded_and_stops_when_the_consumer_does() -> None:
    src = Source(10_000)

    async def main() -> None:
        stream = produced_in_thread(iter(src), depth=4)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                await asyncio.sleep(0.2)  # a slow client: the producer must wait for it
                assert src.produced <= 3 + 4 + 1
                break
        await stream.aclose()

    asyncio.run(main())
    assert src.closed.wait(5), "the source was not closed after the consumer stopped"
    assert src.produced < 20


async def _parts(sizes: list[int], fail: bool = False) -> AsyncIterator[bytes]:
    for i, n in enumerate(sizes):
        await asyncio.sleep(0)
        yield bytes([i % 256]) * n
    if fail:
        raise ConnectionError("client went away")


def test_body_parts_are_merged_into_large_chunks_in_order() -> None:
    sizes = [1000] * 25 + [17]

    async def main() -> list[bytes]:
        async with body_in_thread(_parts(sizes), chunk=4096) as body:
            return await anyio.to_thread.run_sync(lambda: list(body))

    chunks = asyncio.run(main())
    assert b"".join(chunks) == b"".join(bytes([i]) * n for i, n in enumerate(sizes))
    assert all(len(c) >= 4096 for c in chunks[:-1]) and len(chunks) == 6


def test_a_body_that_breaks_raises_in_the_consumer() -> None:
    async def main() -> int:
        async with body_in_thread(_parts([100] * 5, fail=True), chunk=256) as body:

            def consume() -> int:
                n = 0
                for c in body:
                    n += len(c)
                return n

            return await anyio.to_thread.run_sync(consume)

    with pytest.raises(ConnectionError, match="went away"):
        asyncio.run(main())


def test_a_consumer_that_stops_early_leaves_the_rest_unread() -> None:
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        while True:
            read += 1
            await asyncio.sleep(0)
            yield b"x" * 1000

    async def main() -> bytes:
        async with body_in_thread(endless(), chunk=2000, depth=2) as body:
            first = await anyio.to_thread.run_sync(lambda: next(iter(body)))
            await asyncio.sleep(0.1)
            return first

    start = time.monotonic()
    assert asyncio.run(main()) == b"x" * 2000
    assert time.monotonic() - start < 5
    assert read <= 2 * 4 + 4  # queue bound (2 chunks of 2 parts) + the one merged and taken


def test_a_slow_body_is_handed_over_as_it_arrives() -> None:
    """Bytes of a slow client are not held back waiting for a full chunk (the store's temp
    file must keep growing, or a sweeper would take it for abandoned)."""

    async def slow() -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i]) * 100
            await asyncio.sleep(0.3)

    async def main() -> list[tuple[float, bytes]]:
        t0 = time.monotonic()
        async with body_in_thread(slow(), chunk=1 << 20) as body:
            return await anyio.to_thread.run_sync(
                lambda: [(time.monotonic() - t0, c) for c in body]
            )

    got = asyncio.run(main())
    assert [c for _, c in got] == [bytes([i]) * 100 for i in range(3)]
    for i, (t, _) in enumerate(got):
        assert t < 0.3 * i + 0.25, got  # each part within ~FLUSH_AFTER of its arrival
