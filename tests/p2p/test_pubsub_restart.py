"""py-libp2p numbers pubsub messages from the clock in seconds, one more per
publish, and peers drop an id they saw in the last 120 s: a node that published
faster than once a second and restarts would reuse its last run's ids, and its
heartbeats be ignored (found by the rolling-restart fault test). ``P2PHost``
numbers from the clock in nanoseconds instead."""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.p2p.host import P2PHost

from .helpers import running_hosts, settings


async def _serve_with_key(nursery, key):
    h = P2PHost(key, settings())
    await nursery.start(h.serve)
    return h


async def _delivered(sender, receiver, data: bytes) -> bool:
    """Publish ``data`` until ``receiver`` gets it or 5 s pass (the gossip mesh forms asynchronously)."""
    got = []

    async def recv():
        while True:
            msg = await receiver.next_message()
            if msg.data == data:
                got.append(msg)
                return

    async with trio.open_nursery() as n:
        n.start_soon(recv)
        with trio.move_on_after(5):
            while not got:
                await sender.publish(data)
                with trio.move_on_after(0.3):
                    while not got:
                        await trio.sleep(0.02)
        n.cancel_scope.cancel()
    return bool(got)


async def test_a_node_that_published_fast_is_heard_at_once_after_a_restart():
    key = create_new_key_pair()
    with trio.fail_after(60):
        async with running_hosts(settings()) as (b,):
            async with trio.open_nursery() as first_run:
                a = await _serve_with_key(first_run, key)
                await a.connect(b.addrs())
                assert await _delivered(a, b, b"first run")
                for i in range(200):  # far more than one a second: ahead of the clock
                    await a.publish(b"burst %d" % i)
                assert await _delivered(a, b, b"last of the first run")  # b has seen the burst's ids
                last_id = a._pubsub.counter
                first_run.cancel_scope.cancel()
            async with trio.open_nursery() as second_run:
                a2 = await _serve_with_key(second_run, key)
                # Its message numbers start past every one the first run used, so none is "seen".
                assert a2._pubsub.counter > last_id
                await a2.connect(b.addrs())
                # With seconds-based numbering these ids were all seen already: dropped.
                assert await _delivered(a2, b, b"second run")
                second_run.cancel_scope.cancel()
