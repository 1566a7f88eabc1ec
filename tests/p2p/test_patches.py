"""py-libp2p 0.8.1 problems that patches.py works around, shown with real hosts."""

from __future__ import annotations

import struct
from collections import Counter

import trio
from libp2p.stream_muxer.yamux import yamux

from meshollama.httpmsg import ProxyRequest
from meshollama.p2p import patches

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
