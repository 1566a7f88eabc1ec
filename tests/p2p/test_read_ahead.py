"""The server's read-ahead: tokens that pile up while a write is in progress go out as one piece."""

from __future__ import annotations

import pytest
import trio

from meshollama.errors import UpstreamBroken
from meshollama.p2p.httpstream import _read_ahead


def body(chunks, *, fail: Exception | None = None, done: trio.Event | None = None, hang: bool = False):
    async def gen():
        try:
            for c in chunks:
                yield c
                await trio.sleep(0)
            if hang:
                await trio.sleep_forever()
            if fail is not None:
                raise fail
        finally:
            if done is not None:
                done.set()

    return gen()


async def test_pieces_that_arrive_during_a_slow_write_are_joined():
    chunks = [b"%d\n" % i for i in range(50)]
    got = []
    with trio.fail_after(5):
        async with _read_ahead(body(chunks)) as pieces:
            async for piece, _last in pieces:
                got.append(piece)
                await trio.sleep(0.01)  # a slow link
    assert b"".join(got) == b"".join(chunks)
    assert len(got) < 10  # many tokens per write, not one each


async def test_the_last_piece_says_so_when_the_body_has_already_ended():
    async def one_shot():
        yield b"whole answer"

    with trio.fail_after(5):
        async with _read_ahead(one_shot()) as pieces:
            await trio.sleep(0.01)  # the backend is done before the writer looks
            got = [p async for p in pieces]
    assert got == [(b"whole answer", True)]


async def test_a_fast_writer_sends_each_piece_at_once():
    chunks = [b"a", b"b", b"c"]
    with trio.fail_after(5):
        async with _read_ahead(body(chunks)) as pieces:
            got = [p async for p, _last in pieces]
    assert b"".join(got) == b"abc"


async def test_an_error_comes_after_the_bytes_before_it():
    got = []
    with trio.fail_after(5):
        with pytest.raises(UpstreamBroken, match="died"):
            async with _read_ahead(body([b"x", b"y"], fail=UpstreamBroken("died"))) as pieces:
                async for piece, _last in pieces:
                    got.append(piece)
                    await trio.sleep(0.01)
    assert b"".join(got) == b"xy"


async def test_an_error_before_any_byte_is_raised_plainly():
    with trio.fail_after(5):
        with pytest.raises(UpstreamBroken):  # not an ExceptionGroup
            async with _read_ahead(body([], fail=UpstreamBroken("no"))) as pieces:
                async for _ in pieces:
                    pass


async def test_leaving_early_stops_the_body():
    done = trio.Event()
    with trio.fail_after(5):
        async with _read_ahead(body([b"first"], hang=True, done=done)) as pieces:
            async for _ in pieces:
                break
        await done.wait()
