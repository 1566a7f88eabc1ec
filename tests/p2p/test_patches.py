"""py-libp2p 0.8.1 problems that patches.py works around, shown with real hosts."""

from __future__ import annotations

import struct
from collections import Counter

import trio
import trio.testing
from libp2p.stream_muxer.yamux import yamux

from meshollama.httpmsg import ProxyRequest
from meshollama.p2p import patches
from meshollama import pace

from .test_host import ScriptedBackend, fetch, http_pair

WINDOW_UPDATE = 1


async def _frames_per_exchange(requests: int = 10) -> Counter:
    """Yamux frames written, by (type, flags), over ``requests`` small exchanges."""
    seen: Counter = Counter()
    original = yamux.Yamux._write_frame

    async def counting(self, data: bytes) -> None:
        _ver, typ, flags, _sid, _length = struct.unpack(yamux.YAMUX_HEADER_FORMAT, data[: yamux.HEADER_SIZE])
        seen[(typ, flags)] += 1
        await original(self, data)

    yamux.Yamux._write_frame = counting
    try:
        async with http_pair(ScriptedBackend()) as (_a, _b, up, _):
            for _ in range(requests):
                await fetch(up, ProxyRequest("POST", "/api/chat", (), b'{"model":"m"}'))
    finally:
        yamux.Yamux._write_frame = original
    return seen


async def test_stock_yamux_sends_a_window_update_per_small_read_and_the_patch_batches_them():
    patches.patch_yamux_window_updates()  # what every P2PHost applies
    patched = patches._PATCHED_YAMUX_METHOD
    stock = patches._STOCK_YAMUX_METHOD
    with trio.fail_after(30):
        yamux.YamuxStream._auto_tune_and_send_window_update = stock
        try:
            before = await _frames_per_exchange()
        finally:
            yamux.YamuxStream._auto_tune_and_send_window_update = patched
        after = await _frames_per_exchange()
    assert before[(WINDOW_UPDATE, 0)] >= 10  # at least one per exchange: the problem
    assert after[(WINDOW_UPDATE, 0)] == 0  # small exchanges never owe half a window


async def test_buffered_tcp_reads_return_the_same_bytes_in_the_same_order():
    from libp2p.io.trio import TrioTCPStream

    patches.patch_buffered_tcp_reads()
    left, right = trio.testing.memory_stream_pair()
    reader = TrioTCPStream(right)
    payload = bytes(range(256)) * 40
    with trio.fail_after(5):
        await left.send_all(payload)
        got = [await reader.read(2), await reader.read(0), await reader.read(3), await reader.read(1000)]
        while sum(map(len, got)) < len(payload):
            got.append(await reader.read(None))
        assert b"".join(got) == payload
        assert [len(g) for g in got[:4]] == [2, 0, 3, 1000]  # never more than asked
        await left.aclose()
        assert await reader.read(10) == b""  # end of stream still reads as b""


async def test_buffered_tcp_reads_cut_recv_calls_per_exchange():
    """Counted where the system calls are: trio's SocketStream.receive_some."""
    from libp2p.io import trio as libp2p_trio

    patches.patch_buffered_tcp_reads()
    patched, stock = libp2p_trio.TrioTCPStream.read, patches._STOCK_TCP_READ
    receive_some = trio.SocketStream.receive_some
    calls = [0]

    async def counting(self, max_bytes=None):
        calls[0] += 1
        return await receive_some(self, max_bytes)

    async def receives_for_ten_exchanges() -> int:
        async with http_pair(ScriptedBackend()) as (_a, _b, up, _):
            await fetch(up)  # connection set up and a stream pooled
            calls[0] = 0
            for _ in range(10):
                await fetch(up)
            return calls[0]

    trio.SocketStream.receive_some = counting
    try:
        with trio.fail_after(30):
            libp2p_trio.TrioTCPStream.read = stock
            before = await receives_for_ten_exchanges()
            libp2p_trio.TrioTCPStream.read = patched
            after = await receives_for_ten_exchanges()
    finally:
        trio.SocketStream.receive_some = receive_some
        libp2p_trio.TrioTCPStream.read = patched
    assert after < before * 0.7, (before, after)


def test_library_loops_are_paced_and_the_yamux_upkeep_is_spaced_whatever_the_order():
    """pace_library_loops copies the sweeper with the module's globals as they are: it spaces
    the Yamux upkeep itself first, so calling it alone still gives the 5 minute sweep."""
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    patches.pace_library_loops()
    assert yamux.RTT_MEASURE_INTERVAL >= patches.YAMUX_RTT_EVERY
    assert yamux._STALE_STREAM_SWEEP_INTERVAL >= patches.YAMUX_SWEEP_EVERY
    for fn in (GossipSub.heartbeat, yamux.Yamux._stale_stream_sweeper):
        paced_trio = fn.__globals__["trio"]
        assert isinstance(paced_trio, patches._PacedTrio) and paced_trio.sleep is pace.tick
    sweeper = yamux.Yamux._stale_stream_sweeper
    assert sweeper.__globals__["_STALE_STREAM_SWEEP_INTERVAL"] >= patches.YAMUX_SWEEP_EVERY
    assert DCUtRProtocol._auto_drive_loop is patches._auto_drive_loop
