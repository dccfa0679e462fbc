"""How a download streams under load (service/downloads.py): the checked stream sends all but
its last chunk at once, and pieces are rebuilt a few at a time however many streams run."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import pytest

from core.errors import IntegrityError
from core.reconstruct import StreamCheck
from service.downloads import REBUILD_AT_ONCE, in_turn, verified

CHUNKS = [b"header", b"a" * 10, b"b" * 10, b"tail"]
SIZE = sum(map(len, CHUNKS))


def _source(log: list[str]) -> Iterator[bytes]:
    for chunk in CHUNKS:
        log.append(f"made {chunk[:1]!r}")
        yield chunk


def _check(data: bytes) -> StreamCheck:
    return StreamCheck("sha256", hashlib.sha256(data).hexdigest())


def test_with_the_size_known_only_the_last_chunk_waits_for_the_digest() -> None:
    log: list[str] = []
    out = verified(_source(log), _check(b"".join(CHUNKS)), what="f", cause="c", size=SIZE)
    assert next(out) == b"header"
    assert log == ["made b'h'"]  # the header went before anything else was made
    assert b"".join(out) == b"".join(CHUNKS[1:])


def test_without_the_size_each_chunk_waits_for_the_next() -> None:
    log: list[str] = []
    out = verified(_source(log), _check(b"".join(CHUNKS)), what="f", cause="c")
    assert next(out) == b"header"
    assert log == ["made b'h'", "made b'a'"]


@pytest.mark.parametrize("size", [SIZE, None])
def test_a_mismatch_cuts_the_stream_before_its_last_chunk(size: int | None) -> None:
    got: list[bytes] = []
    with pytest.raises(IntegrityError, match="does not match"):
        for chunk in verified(iter(CHUNKS), _check(b"other"), what="f", cause="c", size=size):
            got.append(bytes(chunk))
    assert got == CHUNKS[:-1]


def test_a_short_source_is_cut_too() -> None:
    """A source that ends early never reaches ``size``: the digest decides, the client sees a
    short body."""
    short = CHUNKS[:2]
    with pytest.raises(IntegrityError):
        list(verified(iter(short), _check(b"".join(CHUNKS)), what="f", cause="c", size=SIZE))


def test_pieces_are_made_a_few_at_a_time_whatever_the_number_of_streams() -> None:
    slots = REBUILD_AT_ONCE
    busy, most = 0, 0
    lock = threading.Lock()

    def pieces() -> Iterator[bytes]:
        nonlocal busy, most
        for _ in range(3):
            with lock:
                busy += 1
                most = max(most, busy)
            time.sleep(0.01)
            with lock:
                busy -= 1
            yield b"x"

    def stream() -> None:
        for _ in in_turn(pieces()):
            time.sleep(0.005)  # sending: no slot held

    threads = [threading.Thread(target=stream) for _ in range(slots + 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == slots
